"""The task suite: seeded, split-disjoint, and right (answers recomputed independently)."""

from __future__ import annotations

import collections
import random
import re

import pytest
from frugalserve.experts.zoo import tasks as T


def test_generate_is_deterministic_and_prefix_stable():
    a = T.generate("test", 60, seed=0)
    assert a == T.generate("test", 60, seed=0)
    assert T.generate("test", 30, seed=0) == a[:30]  # `--limit` takes a stable slice
    assert a != T.generate("test", 60, seed=1)
    assert len({t.prompt for t in a}) == len(a)


def test_generate_is_balanced_over_domains_and_difficulties():
    counts = collections.Counter((t.domain, t.difficulty) for t in T.generate("calib", 90))
    assert counts == {(d, k): 10 for d in T.DOMAINS for k in T.DIFFICULTIES}


def test_splits_never_share_a_prompt():
    drawn = {s: {t.prompt for t in T.generate(s, 450, seed=3)} for s in T.SPLITS}
    train_stream = [next(it) for it in [T.training_stream(seed=5)] for _ in range(3000)]
    drawn["train"] |= {t.prompt for t in train_stream}
    for a in T.SPLITS:
        for b in T.SPLITS:
            if a < b:
                assert not drawn[a] & drawn[b], (a, b)
    for split, prompts in drawn.items():
        assert all(T.split_of(p) == split for p in prompts)


def test_split_shares_follow_the_hash():
    stream = T.training_stream(seed=1)
    words = [f"probe {i}" for i in range(20000)]
    shares = collections.Counter(T.split_of(w) for w in words)
    assert abs(shares["train"] / 20000 - 0.8) < 0.02
    assert abs(shares["test"] / 20000 - 0.1) < 0.02
    assert next(stream).split == "train"


_EXPR = re.compile(r"-?\d+(?:\s*[-+*]\s*\d+)+")
_NUMBERS = re.compile(r"\d+")


def _arith_answer(prompt: str) -> int:
    """From the prompt's words and symbols: an expression is evaluated left to right; worded
    operations are read from their operator word, "subtract b from a" and "take b away from a"
    reversing the operands' order."""
    text = prompt.lower()
    expr = _EXPR.search(text)
    if expr:
        tokens = re.findall(r"\d+|[-+*]", expr.group())
        if "*" in tokens:
            return int(tokens[0]) * int(tokens[2])
        value = int(tokens[0])
        for op, term in zip(tokens[1::2], tokens[2::2]):
            value = value + int(term) if op == "+" else value - int(term)
        return value
    a, b = map(int, _NUMBERS.findall(text))
    if " from " in text:  # subtract b from a / take b away from a
        return b - a
    if any(w in text for w in ("plus", "sum", "add", "total")):
        return a + b
    if any(w in text for w in ("minus", "difference", "away")):
        return a - b
    if any(w in text for w in ("times", "product", "multipl")):
        return a * b
    raise AssertionError(f"no operation in {prompt!r}")


def _text_answer(prompt: str) -> str:
    quoted = re.findall(r'"([^"]*)"', prompt)
    word = max(quoted, key=len)
    letter = min(quoted, key=len) if len(quoted) == 2 else None
    text = prompt.lower().replace(f'"{word}"', "").replace(f'"{letter}"', "" if letter else "")
    if letter is not None:
        if any(w in text for w in ("remov", "delet", "without", "take out", "drop", "strip",
                                   "except", "erase", "leave out", "no ")):
            return "".join(c for c in word if c != letter)
        return str(sum(1 for c in word if c == letter))
    if any(w in text for w in ("revers", "backwards", "right to left")):
        return "".join(reversed(list(word)))
    if "vowel" in text:
        return str(sum(1 for c in word if c in "aeiou"))
    if any(w in text for w in ("sort", "alphabet", "order", "a to z")):
        counts = collections.Counter(word)
        return "".join(c * counts[c] for c in "abcdefghijklmnopqrstuvwxyz")
    if any(w in text for w in ("capital", "upper", "caps")):
        return "".join(chr(ord(c) - 32) for c in word)
    if any(w in text for w in ("last", "end", "final")):
        return word[len(word) - 1]
    if any(w in text for w in ("how many", "how long", "length", "count", "number")):
        return str(sum(1 for _ in word))
    raise AssertionError(f"no operation in {prompt!r}")


_ATTRIBUTE_WORDS = {"capital": "capital", "city": "capital", "found": "founded", "year": "founded",
                    "flag": "colour", "colour": "colour", "animal": "animal"}


def _facts_answer(prompt: str) -> str:
    by_name = {e.name: e for e in T.world()}
    name = next(n for n in re.findall(r"[A-Z][a-z]+", prompt) if n in by_name)
    text = prompt.replace(name, "").lower()
    at = {}  # attribute -> where its first word appears
    for word, attr in _ATTRIBUTE_WORDS.items():
        if word in text:
            at[attr] = min(at.get(attr, len(text)), text.index(word))
    attrs = sorted(at, key=at.get)
    if not attrs or len(attrs) > 2:
        raise AssertionError(f"no attribute in {prompt!r}")
    return ", ".join(str(getattr(by_name[name], a)) for a in attrs)


def _independent_answer(task: T.Task) -> str:
    """Recompute the answer from the prompt text alone, by other means than the generator."""
    return {"arith": lambda p: str(_arith_answer(p)), "text": _text_answer,
            "facts": _facts_answer}[task.domain](task.prompt)


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_answers_match_an_independent_computation(split):
    tasks = T.generate(split, 600, seed=7)
    kinds = collections.Counter((t.domain, t.kind) for t in tasks)
    assert len(kinds) == 4 + 8 + 5  # every operation and attribute is drawn
    for task in tasks:
        assert task.answer == _independent_answer(task), task


def test_every_operation_has_eight_phrasings_and_a_disjoint_heldout_family():
    assert set(T.TEMPLATES) == set(T.HELDOUT_TEMPLATES)
    for kind, family in T.TEMPLATES.items():
        assert len(set(family)) >= 8, kind
        assert len(T.HELDOUT_TEMPLATES[kind]) >= 3, kind
        assert not set(family) & set(T.HELDOUT_TEMPLATES[kind]), kind
    # each template is drawn: in a large sample every in-template family member shows up
    seen = collections.Counter()
    rng = random.Random(0)
    for _ in range(20000):
        task = T.sample(rng.choice(T.DOMAINS), rng)
        seen[task.kind] += 1
    assert set(seen) == set(T.TEMPLATES)


def test_arithmetic_operands_and_difficulty():
    for task in T.generate("test", 300, seed=2, domains=("arith",)):
        numbers = _NUMBERS.findall(task.prompt)
        assert len(numbers) == (3 if task.kind == "chain" else 2), task
        assert all(1 <= len(n) <= 5 for n in numbers)
        if task.difficulty == 1:
            assert max(map(len, numbers)) <= 2
        if task.difficulty == 3:
            assert max(map(len, numbers)) >= 3


def test_text_words_grow_with_difficulty():
    for task in T.generate("test", 300, seed=4, domains=("text",)):
        word = max(re.findall(r'"([^"]*)"', task.prompt), key=len)
        lo, hi = T.TEXT_LENGTHS[task.difficulty]
        assert lo <= len(word) <= hi + (task.kind == "drop"), task


def test_facts_world_and_zipf_frequency():
    world = T.world()
    assert len(world) == T.NUM_ENTITIES
    assert len({e.name for e in world} | {e.capital for e in world}) == 2 * len(world)
    seen = collections.Counter()
    stream = T.training_stream(("facts",), seed=0)
    by_name = {e.name: e for e in world}
    for _ in range(6000):
        task = next(stream)
        name = next(n for n in re.findall(r"[A-Z][a-z]+", task.prompt) if n in by_name)
        seen[T.popularity_band(by_name[name].rank)] += 1
    # per entity, the head (100 countries) is asked far more often than the tail (2000)
    assert seen[1] / 100 > 10 * seen[3] / 2000
    assert seen[3] > 0
    # evaluation draws each popularity band equally
    bands = collections.Counter(t.difficulty for t in T.generate("test", 90, domains=("facts",)))
    assert bands == {1: 30, 2: 30, 3: 30}


def test_exact_match_normalises_whitespace_only():
    assert T.is_correct("  12 ", "12")
    assert T.is_correct("a  b\n", "a b")
    assert not T.is_correct("ABC", "abc")
    assert not T.is_correct("12.0", "12")


def test_prompts_are_chat_messages_and_ids_stable():
    task = T.generate("test", 1)[0]
    assert task.messages == ({"role": "user", "content": task.prompt},)
    assert task.id == T.generate("test", 1)[0].id and task.id.startswith(task.domain + "-")


def test_asking_for_more_than_a_split_holds_is_a_clear_error(monkeypatch):
    # every band two countries wide: the test split holds under 100 prompts of each
    monkeypatch.setattr(T, "POPULARITY_BANDS", ((0, 2), (2, 4), (4, 6)))
    with pytest.raises(ValueError, match="no more facts prompts of difficulty"):
        T.generate("test", 900, domains=("facts",))


def test_heldout_split_uses_only_heldout_phrasings():
    held = T.generate("heldout", 90, seed=0)
    assert held == T.generate("heldout", 90, seed=0)
    assert collections.Counter((t.domain, t.difficulty) for t in held) == {
        (d, k): 10 for d in T.DOMAINS for k in T.DIFFICULTIES}
    assert all(t.split == "heldout" and t.heldout for t in held)
    # no held-out prompt could have come from a training / calib / test template
    stream = T.training_stream(seed=2)
    seen = {t.prompt for t in (next(stream) for _ in range(3000))}
    seen |= {t.prompt for s in T.SPLITS for t in T.generate(s, 300)}
    assert not seen & {t.prompt for t in held}
    trained_starts = {p.split()[0] for p in seen}
    assert {t.prompt.split()[0] for t in held if t.domain == "arith"}.isdisjoint(trained_starts)


def test_heldout_answers_match_their_in_template_twins():
    for domain in T.DOMAINS:
        for difficulty in T.DIFFICULTIES:
            a, b = random.Random(11), random.Random(11)
            plain = T.sample(domain, a, difficulty)
            held = T.sample(domain, b, difficulty, heldout=True)
            assert (held.answer, held.kind, held.difficulty) == (plain.answer, plain.kind, plain.difficulty)
            assert held.prompt != plain.prompt
