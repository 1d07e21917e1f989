"""Graders: is an answer right, given a reference? Pure functions of two strings.

`frugalserve calibrate --data FILE.jsonl` labels every expert's answer with one of these (per line
with `"grader"`, or `--grader` for the file):

| grader | right when |
|---|---|
| `exact` | the answer equals the reference, character for character after stripping the ends |
| `normalized` | equal after lower-casing, dropping punctuation and articles, collapsing spaces (SQuAD's rule) |
| `numeric` | both parse as numbers (the first number in the answer) within `tolerance` (absolute, default 1e-6) |
| `regex` | the reference, a regular expression, matches somewhere in the answer |
| `contains` | the normalized reference occurs in the normalized answer |
| `json` | both parse as JSON and are equal (key order and spacing do not matter) |
"""

from __future__ import annotations

import json
import re
import string

GRADERS = ("exact", "normalized", "numeric", "regex", "contains", "json")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _number(text: str) -> float | None:
    m = _NUMBER.search(text.replace(",", "") if text.count(",") and "." in text else text)
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", "."))
    except ValueError:
        return None


def grade(grader: str, answer: str, reference: str, *, tolerance: float = 1e-6) -> bool:
    """Whether `answer` is right under `grader` against `reference`."""
    if grader == "exact":
        return answer.strip() == reference.strip()
    if grader == "normalized":
        return normalize_answer(answer) == normalize_answer(reference)
    if grader == "numeric":
        a, r = _number(answer), _number(reference)
        return a is not None and r is not None and abs(a - r) <= tolerance
    if grader == "regex":
        return re.search(reference, answer) is not None
    if grader == "contains":
        return normalize_answer(reference) in normalize_answer(answer)
    if grader == "json":
        try:
            return json.loads(answer) == json.loads(reference)
        except ValueError:
            return False
    raise ValueError(f"unknown grader {grader!r}; graders: {', '.join(GRADERS)}")


def check_grader(grader: str, reference: str) -> None:
    """Raise ValueError for a grader or reference that cannot work (unknown name, bad regex,
    a numeric reference without a number, a json reference that does not parse)."""
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; graders: {', '.join(GRADERS)}")
    if grader == "regex":
        try:
            re.compile(reference)
        except re.error as exc:
            raise ValueError(f"regex reference {reference!r} does not compile: {exc}") from None
    if grader == "numeric" and _number(reference) is None:
        raise ValueError(f"numeric reference {reference!r} holds no number")
    if grader == "json":
        try:
            json.loads(reference)
        except ValueError:
            raise ValueError(f"json reference {reference!r} does not parse") from None
