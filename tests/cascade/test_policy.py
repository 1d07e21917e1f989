from __future__ import annotations

import numpy as np
import pytest
from frugalserve.cascade.policy import cascade_step, gate_choose, replay_cascade, replay_gate


def test_gate_picks_cheapest_when_equally_likely():
    d = gate_choose(["s", "l"], [0.9, 0.9], [1.0, 10.0], cost_weight=0.1, floor=0.0, default="l")
    assert d.experts == ("s",) and not d.fallback


def test_gate_pays_for_accuracy_when_cost_weight_is_zero():
    d = gate_choose(["s", "l"], [0.5, 0.9], [1.0, 10.0], cost_weight=0.0, floor=0.0, default="s")
    assert d.experts == ("l",)


def test_gate_falls_back_under_the_floor():
    d = gate_choose(["s", "l"], [0.1, 0.2], [1.0, 10.0], cost_weight=0.0, floor=0.3, default="l")
    assert d.fallback and d.experts == ("l",) and "floor" in d.reason


def test_gate_top_k():
    d = gate_choose(["a", "b", "c"], [0.2, 0.9, 0.8], [1, 1, 1], cost_weight=0, floor=0,
                    default="a", k=2)
    assert d.experts == ("b", "c")


@pytest.mark.parametrize("kwargs, accept, reason", [
    (dict(tier=2, n_tiers=3, score=0.0, threshold=0.9), True, "last_tier"),
    (dict(tier=0, n_tiers=3, score=0.95, threshold=0.9), True, "score"),
    (dict(tier=0, n_tiers=3, score=0.5, threshold=0.9), False, "score"),
    (dict(tier=0, n_tiers=3, score=0.5, threshold=0.9, spent=1, next_cost=5, budget=4), True,
     "budget"),
    (dict(tier=1, n_tiers=3, score=0.5, threshold=0.9, max_tier=1), True, "max_tier"),
])
def test_cascade_step(kwargs, accept, reason):
    step = cascade_step(**kwargs)
    assert (step.accept, step.reason) == (accept, reason)


def test_replay_matches_stepwise_decisions():
    rng = np.random.default_rng(0)
    scores, correct = rng.random((200, 3)), rng.random((200, 3)) < 0.5
    cost = np.tile([1.0, 5.0, 20.0], (200, 1))
    ths = (0.6, 0.3)
    answered, ok, spent = replay_cascade(scores, correct, cost, ths)
    for i in range(200):
        tier, total = 0, 0.0
        while True:
            total += cost[i, tier]
            if cascade_step(tier, 3, scores[i, tier], ths[tier] if tier < 2 else 0).accept:
                break
            tier += 1
        assert answered[i] == tier and spent[i] == total and ok[i] == correct[i, tier]


def test_replay_gate_matches_choices_one_by_one():
    rng = np.random.default_rng(1)
    probs, costs = rng.random((100, 3)), [1.0, 4.0, 9.0]
    chosen = replay_gate(["a", "b", "c"], probs, costs, cost_weight=0.3, floor=0.4, default="c")
    for p, col in zip(probs, chosen):
        d = gate_choose(["a", "b", "c"], p, costs, cost_weight=0.3, floor=0.4, default="c")
        assert "abc"[col] == d.experts[0]
    assert (chosen == 2).sum() > (probs.max(axis=1) < 0.4).sum() - 1  # every fallback went to c
