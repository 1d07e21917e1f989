from __future__ import annotations

import pytest
from frugalserve.cascade.graders import check_grader, grade


@pytest.mark.parametrize("grader,answer,reference,ok", [
    ("exact", " 42 ", "42", True), ("exact", "42.", "42", False),
    ("normalized", "The Eiffel tower!", "eiffel Tower", True), ("normalized", "tower", "eiffel tower", False),
    ("numeric", "about 3.1416", "3.14159", False), ("numeric", "x = -7", "-7.0", True),
    ("regex", "the year 1969, July", r"\b1969\b", True), ("regex", "1970", r"^1969$", False),
    ("contains", "I think it is Paris, France.", "paris", True), ("contains", "Lyon", "Paris", False),
    ("json", '{"b": 2, "a": [1]}', '{"a":[1],"b":2}', True), ("json", "{'a': 1}", '{"a": 1}', False),
])
def test_each_grader(grader, answer, reference, ok):
    assert grade(grader, answer, reference) is ok


def test_numeric_tolerance_and_bad_references():
    assert grade("numeric", "3.1416", "3.14159", tolerance=1e-3)
    for grader, ref, match in (("regex", "(", "does not compile"), ("numeric", "n/a", "no number"),
                               ("json", "{", "does not parse"), ("fuzzy", "x", "unknown grader")):
        with pytest.raises(ValueError, match=match):
            check_grader(grader, ref)
