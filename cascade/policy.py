"""Routing decisions as pure functions returning small frozen dataclasses.

The router calls these with numbers it has (gate probabilities, scorer outputs, costs); the
offline evaluation calls the same functions, so live and offline decisions agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GateDecision:
    experts: tuple[str, ...]  # best first; top-k asks all of them
    probabilities: tuple[float, ...]  # P(correct) the gate predicts for each chosen expert
    fallback: bool  # True when no expert cleared the confidence floor
    reason: str


def gate_choose(
    experts: Sequence[str],
    p_correct: Sequence[float] | np.ndarray,
    costs: Sequence[float] | np.ndarray,
    *,
    cost_weight: float,
    floor: float,
    default: str,
    k: int = 1,
) -> GateDecision:
    """Pick the expert(s) with the best `P(correct) − cost_weight · cost / max(cost)`.

    When even the most likely expert is under `floor`, fall back to `default`.
    """
    p = np.asarray(p_correct, dtype=float)
    c = np.asarray(costs, dtype=float)
    utility = p - cost_weight * c / max(float(c.max()), 1e-12)
    order = np.lexsort((c, -utility))  # best utility first, cheaper first on ties
    if float(p.max()) < floor:
        i = list(experts).index(default)
        return GateDecision((default,), (float(p[i]),), True,
                            f"max P(correct)={p.max():.3f} under floor {floor:.3f}")
    chosen = order[: max(1, k)]
    return GateDecision(
        tuple(experts[i] for i in chosen), tuple(float(p[i]) for i in chosen), False,
        f"utility {utility[chosen[0]]:.3f} (P={p[chosen[0]]:.3f}, cost weight {cost_weight})",
    )


def replay_gate(
    experts: Sequence[str],
    p_correct: np.ndarray,  # [n, e] the gate's P(correct) per prompt and expert
    costs: Sequence[float] | np.ndarray,
    *,
    cost_weight: float,
    floor: float,
    default: str,
) -> np.ndarray:
    """`gate_choose` (top-1) over a matrix: the chosen expert's column for each prompt."""
    return np.array([list(experts).index(gate_choose(
        experts, p, costs, cost_weight=cost_weight, floor=floor, default=default).experts[0])
        for p in np.atleast_2d(p_correct)], dtype=int)


@dataclass(frozen=True)
class OperatingPoint:
    """A calibrated cascade: tiers in order, the acceptance threshold of each but the last, and
    the accuracy and mean cost per request it reached on the calibration prompts."""

    order: tuple[str, ...]
    thresholds: tuple[float, ...]
    accuracy: float
    cost: float

    def as_dict(self) -> dict:
        return {"order": list(self.order), "thresholds": [float(t) for t in self.thresholds],
                "accuracy": self.accuracy, "cost": self.cost}

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return cls(tuple(d["order"]), tuple(float(t) for t in d["thresholds"]),
                   float(d["accuracy"]), float(d["cost"]))


def best_under_budget(frontier: Sequence[OperatingPoint], budget: float) -> OperatingPoint | None:
    """The most accurate operating point whose mean cost is within `budget` (cheaper on ties)."""
    ok = [p for p in frontier if p.cost <= budget + 1e-12]
    return max(ok, key=lambda p: (p.accuracy, -p.cost)) if ok else None


@dataclass(frozen=True)
class CascadeStep:
    accept: bool
    reason: str  # "score", "last_tier", "budget", "max_tier"


def cascade_step(
    tier: int,
    n_tiers: int,
    score: float,
    threshold: float,
    *,
    spent: float = 0.0,
    next_cost: float = 0.0,
    budget: float | None = None,
    max_tier: int | None = None,
) -> CascadeStep:
    """After tier `tier` answered with `score`: accept it or escalate to the next tier."""
    if tier >= n_tiers - 1:
        return CascadeStep(True, "last_tier")
    if max_tier is not None and tier >= max_tier:
        return CascadeStep(True, "max_tier")
    if score >= threshold:
        return CascadeStep(True, "score")
    if budget is not None and spent + next_cost > budget:
        return CascadeStep(True, "budget")
    return CascadeStep(False, "score")


def replay_cascade(
    scores: np.ndarray,  # [n, t] scorer output of each tier's answer
    correct: np.ndarray,  # [n, t]
    cost: np.ndarray,  # [n, t]
    thresholds: Sequence[float],  # t - 1 values
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `cascade_step` over a matrix: (answered tier, correct, cost) per prompt."""
    n, t = scores.shape
    answered = np.full(n, t - 1)
    open_ = np.ones(n, dtype=bool)
    for j, th in enumerate(thresholds):
        take = open_ & (scores[:, j] >= th)
        answered[take] = j
        open_ &= ~take
    spent = np.cumsum(cost, axis=1)[np.arange(n), answered]
    return answered, correct[np.arange(n), answered], spent


@dataclass(frozen=True)
class CascadePlan:
    """Where a cascade starts before any tier runs: `start` is a tier index; `reason` is
    "unfamiliar" (straight to the fallback tier), "cost_guard" (the expected climb costs more
    than the top tier), "predicted_fail" (the tiers below `start` are predicted to fail) or
    "cheapest"."""

    start: int
    reason: str
    expected_cost: float  # of the climb from `start`, as the gate predicts it


def expected_climb_cost(p_correct: Sequence[float] | np.ndarray, costs: Sequence[float] | np.ndarray,
                        start: int = 0) -> float:
    """Mean cost of a cascade from `start` when tier i's answer is accepted with probability
    `p_correct[i]` (the gate's prediction) and the last tier always answers."""
    total, reach = 0.0, 1.0
    for i in range(start, len(costs)):
        total += reach * float(costs[i])
        if i < len(costs) - 1:
            reach *= 1.0 - float(p_correct[i])
    return total


def plan_cascade(
    p_correct: Sequence[float] | np.ndarray,  # [t] the gate's P(correct) of each tier, in order
    costs: Sequence[float] | np.ndarray,  # [t] each tier's mean cost per request
    skip_thresholds: Sequence[float],  # [t - 1] start above tier i when its P is under this
    *,
    unfamiliar: bool = False,
    fallback: int | None = None,  # tier index for unfamiliar prompts (default: the last)
    cost_guard: bool = True,
) -> CascadePlan:
    """Pre-generation: skip the tiers predicted to fail; go straight to `fallback` for a prompt
    unlike the calibration data; go straight to the top when the climb is expected to cost more
    than the top tier alone."""
    t = len(costs)
    top = t - 1 if fallback is None else fallback
    if unfamiliar:
        return CascadePlan(top, "unfamiliar", float(costs[top]))
    start = 0
    while start < t - 1 and start < len(skip_thresholds) and p_correct[start] < skip_thresholds[start]:
        start += 1
    expected = expected_climb_cost(p_correct, costs, start)
    if cost_guard and start < t - 1 and expected >= float(costs[t - 1]):
        return CascadePlan(t - 1, "cost_guard", float(costs[t - 1]))
    return CascadePlan(start, "predicted_fail" if start else "cheapest", expected)


def replay_planned_cascade(
    scores: np.ndarray,  # [n, t]
    correct: np.ndarray,  # [n, t]
    cost: np.ndarray,  # [n, t]
    thresholds: Sequence[float],  # t - 1
    start: np.ndarray,  # [n] the tier each prompt starts at
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`replay_cascade` where prompt i starts at tier `start[i]` (the tiers below are not run)."""
    n, t = scores.shape
    start = np.asarray(start, dtype=int)
    answered = np.full(n, t - 1)
    open_ = np.ones(n, dtype=bool)
    for j, th in enumerate(thresholds):
        take = open_ & (start <= j) & (scores[:, j] >= th)
        answered[take] = j
        open_ &= ~take
    cum = np.cumsum(cost, axis=1)
    before = np.where(start > 0, cum[np.arange(n), np.maximum(start - 1, 0)], 0.0)
    spent = cum[np.arange(n), answered] - before
    return answered, correct[np.arange(n), answered], spent
