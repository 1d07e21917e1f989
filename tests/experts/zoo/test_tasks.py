"""The task suite: seeded, split-disjoint, and right (answers recomputed independently)."""

from __future__ import annotations

import collections
import operator
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


_ARITH = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _independent_answer(task: T.Task) -> str:
    """Recompute the answer from the prompt text alone, by other means than the generator."""
    if task.domain == "arith":
        a, op, b = _ARITH.match(task.prompt).groups()
        return str(_OPS[op](int(a), int(b)))
    if task.domain == "text":
        quoted = re.findall(r'"([^"]*)"', task.prompt)
        word = quoted[-1]
        if task.prompt.startswith("Reverse"):
            return "".join(reversed(list(word)))
        if task.prompt.startswith("Sort"):
            counts = collections.Counter(word)
            return "".join(c * counts[c] for c in "abcdefghijklmnopqrstuvwxyz")
        if task.prompt.startswith("How many times"):
            return str(sum(1 for c in word if c == quoted[0]))
        if "capital letters" in task.prompt:
            return "".join(chr(ord(c) - 32) for c in word)
        if "last letter" in task.prompt:
            return word[len(word) - 1]
        if task.prompt.startswith("How many letters"):
            return str(sum(1 for _ in word))
    if task.domain == "facts":
        by_name = {e.name: e for e in T.world()}
        name = next(n for n in re.findall(r"[A-Z][a-z]+", task.prompt) if n in by_name)
        entity = by_name[name]
        key = {"capital": "capital", "founded": "founded", "colour": "colour", "flag": "colour",
               "animal": "animal", "year": "founded"}
        for word, attr in key.items():
            if word in task.prompt:
                return str(getattr(entity, attr))
    raise AssertionError(f"cannot recompute {task}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_an_independent_computation(split):
    tasks = T.generate(split, 300, seed=7)
    kinds = collections.Counter((t.domain, t.kind) for t in tasks)
    assert len(kinds) == 3 + 6 + 4  # every operation and attribute is drawn
    for task in tasks:
        assert task.answer == _independent_answer(task), task


def test_arithmetic_operands_and_difficulty():
    for task in T.generate("test", 300, seed=2, domains=("arith",)):
        a, op, b = _ARITH.match(task.prompt).groups()
        assert 1 <= len(a) <= 5 and 1 <= len(b) <= 5
        if task.difficulty == 1:
            assert max(len(a), len(b)) <= 2
        if task.difficulty == 3:
            assert max(len(a), len(b)) >= 3


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


def test_asking_for_more_than_a_split_holds_is_a_clear_error():
    with pytest.raises(ValueError, match="no more facts prompts"):
        T.generate("test", 5000, domains=("facts",))


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
    import random

    for domain in T.DOMAINS:
        for difficulty in T.DIFFICULTIES:
            a, b = random.Random(11), random.Random(11)
            plain = T.sample(domain, a, difficulty)
            held = T.sample(domain, b, difficulty, heldout=True)
            assert (held.answer, held.kind, held.difficulty) == (plain.answer, plain.kind, plain.difficulty)
            assert held.prompt != plain.prompt
