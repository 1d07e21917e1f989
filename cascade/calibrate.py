"""Fit a router on a calibration matrix: scorers, the MoE gate, and cascade thresholds.

FrugalGPT's search: over tier orderings (up to `max_depth` experts) and per-tier acceptance
thresholds taken from a quantile grid of out-of-fold scores, keep every operating point, and
pick the best ordering + thresholds for a budget (max accuracy s.t. mean cost ≤ budget) or for an
accuracy target (least cost s.t. accuracy ≥ target). RouteLLM's threshold-by-quantile is
`threshold_for_share`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from frugalserve.cascade.artifact import CascadePlanSettings, RouterArtifact
from frugalserve.cascade.familiarity import Familiarity, fit_familiarity
from frugalserve.cascade.features import Projector, row_answer_features
from frugalserve.cascade.gate import Gate, fit_gate
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.cascade.metrics import PARITY_TOLERANCE
from frugalserve.cascade.policy import (
    OperatingPoint,
    best_under_budget,
    replay_cascade,
    replay_gate,
    replay_planned_cascade,
)
from frugalserve.cascade.scorer import Scorer, fit_scorer, select_scorer

GATE_COST_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # searched by choose_gate_settings
SCORER_DIMS = 16  # principal components of the prompt features the scorer sees
PLAN_TOLERANCE = 0.0015  # calib accuracy the start plan may give up: about one prompt in 900

Progress = Callable[[str, int, int], None]


@dataclass
class CalibrationResult:
    experts: list[str]
    projector: Projector
    scorer: Scorer
    gate: Gate
    frontier: list[OperatingPoint]  # cascade Pareto frontier on calib, cheapest first
    cascade: OperatingPoint  # the operating point served by default
    oof_scores: np.ndarray  # [n, e] on calib
    oof_gate: np.ndarray  # [n, e] gate P(correct) on calib
    familiarity: Familiarity | None = None
    plan: CascadePlanSettings | None = None
    summary: dict = field(default_factory=dict)

    def to_artifact(self, featurizer: dict, meta: dict | None = None) -> RouterArtifact:
        """What the router serves: the fitted parts, the featurizer's config, and `meta` with
        the calibration summary."""
        return RouterArtifact(self.experts, featurizer, self.projector, self.scorer, self.gate,
                              self.cascade, self.frontier, dict(meta or {}, **self.summary),
                              familiarity=self.familiarity, plan=self.plan)


def answer_feature_matrix(m: ResponseMatrix) -> dict[str, np.ndarray]:
    return {e: np.stack([row_answer_features(m.rows[i][j]) for i in range(m.n)])
            for j, e in enumerate(m.experts)}


def threshold_for_share(scores: np.ndarray, escalate_share: float) -> float:
    """RouteLLM-style: the threshold under which `escalate_share` of prompts fall."""
    if not 0.0 <= escalate_share <= 1.0:
        raise ValueError(f"escalate_share must be in [0, 1], got {escalate_share}")
    return float(np.quantile(scores, escalate_share))


def search_cascades(scores: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                    experts: Sequence[str], candidates: Sequence[str], max_depth: int = 3,
                    grid: int = 21, progress: Progress | None = None) -> list[OperatingPoint]:
    """Every ordering of up to `max_depth` candidates × a quantile grid of thresholds; returns
    the Pareto frontier (no point both cheaper and more accurate), cheapest first."""
    idx = {e: experts.index(e) for e in candidates}
    orders = [p for d in range(1, max_depth + 1) for p in itertools.permutations(candidates, d)]
    qs = np.linspace(0, 1, grid)
    points: list[OperatingPoint] = []
    for k, order in enumerate(orders):
        cols = [idx[e] for e in order]
        s, c, y = scores[:, cols], cost[:, cols], correct[:, cols]
        grids = [np.unique(np.concatenate([np.quantile(s[:, j], qs), [np.inf]]))
                 for j in range(len(cols) - 1)]
        for ths in itertools.product(*grids):
            _, ok, spent = replay_cascade(s, y, c, ths)
            points.append(OperatingPoint(order, tuple(float(t) for t in ths),
                                         float(ok.mean()), float(spent.mean())))
        if progress:
            progress("cascade orderings", k + 1, len(orders))
    return pareto(points)


def pareto(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    best: list[OperatingPoint] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.accuracy, len(p.order))):
        if not best or p.accuracy > best[-1].accuracy + 1e-12:
            best.append(p)
    return best


def cheapest_reaching(frontier: Sequence[OperatingPoint], target: float) -> OperatingPoint | None:
    ok = [p for p in frontier if p.accuracy >= target - 1e-12]
    return min(ok, key=lambda p: p.cost) if ok else None


def choose_gate_settings(gate: Gate, probs: np.ndarray, correct: np.ndarray,
                         tol: float = 0.005) -> dict:
    """Largest cost weight (then floor) whose calib accuracy stays within `tol` of the best."""
    results = []
    for w in GATE_COST_WEIGHTS:
        choice = replay_gate(gate.experts, probs, gate.mean_cost, cost_weight=w, floor=0.0,
                             default=gate.default)
        acc = float(correct[np.arange(len(choice)), choice].mean())
        cost = float(gate.mean_cost[choice].mean())
        results.append((w, acc, cost))
    top = max(a for _, a, _ in results)
    w, acc, cost = max((r for r in results if r[1] >= top - tol), key=lambda r: r[0])
    return {"cost_weight": w, "accuracy": acc, "cost": cost, "sweep": results}


def fit_router(m: ResponseMatrix, prompt_feats: np.ndarray, *, tiers: Sequence[str],
               default_expert: str | None = None, budget: float | None = None,
               target_accuracy: float | None = None, max_depth: int = 3, seed: int = 0,
               familiar: bool = True, progress: Progress | None = None) -> CalibrationResult:
    """Fit scorer and gate on `m`, search cascades over `tiers`, choose the served point.

    The served point: with `budget`, the most accurate within it; with `target_accuracy`, the
    cheapest reaching it; by default the cheapest within a quarter point of the best tier.
    """
    unknown = [t for t in tiers if t not in m.experts]
    if unknown:
        raise ValueError(f"tiers {unknown} are not in the calibration matrix {m.experts}")
    projector = Projector.fit(prompt_feats, SCORER_DIMS)
    gate_x, scorer_x = prompt_feats, projector(prompt_feats)
    feats = answer_feature_matrix(m)
    oof = np.zeros((m.n, len(m.experts)))
    kinds, scorer_auroc = {}, {}
    for j, e in enumerate(m.experts):
        kinds[e], oof[:, j], aurocs = select_scorer(feats[e], scorer_x, m.correct[:, j], seed)
        scorer_auroc.update({f"{e}/{kind}": a for kind, a in aurocs.items()})
        if progress:
            progress("scorers", j + 1, len(m.experts))
    scorer = fit_scorer(feats, scorer_x, {e: m.correct[:, j] for j, e in enumerate(m.experts)},
                        kinds, seed=seed)
    frontier = search_cascades(oof, m.correct, m.cost, m.experts, list(tiers), max_depth,
                               progress=progress)
    tier_acc = {t: float(m.correct[:, m.column(t)].mean()) for t in tiers}
    if budget is not None:
        served = best_under_budget(frontier, budget)
        if served is None:
            raise ValueError(f"budget {budget} is below the cheapest operating point "
                             f"({frontier[0].cost:.6g} cost units per request)")
    else:
        # Default: parity with the best tier, aiming at half the parity tolerance so that the
        # held-out accuracy keeps some room before it drops below "equal".
        target = (target_accuracy if target_accuracy is not None
                  else max(tier_acc.values()) - PARITY_TOLERANCE / 2)
        served = cheapest_reaching(frontier, target) or frontier[-1]
    gate, oof_gate = _fit_gate_oof(m, gate_x, default_expert or tiers[-1], seed, progress)
    gate_settings = choose_gate_settings(gate, oof_gate, m.correct)
    gate.cost_weight = gate_settings["cost_weight"]
    familiarity = fit_familiarity(m.prompts, prompt_feats, seed=seed) if familiar else None
    plan, plan_summary = fit_cascade_plan(oof, oof_gate, m.correct, m.cost, m.experts, served,
                                          fallback=default_expert or tiers[-1])
    return CalibrationResult(
        experts=list(m.experts), projector=projector, scorer=scorer, gate=gate,
        frontier=frontier, cascade=served,
        oof_scores=oof, oof_gate=oof_gate, familiarity=familiarity, plan=plan,
        summary={"tier_accuracy": tier_acc, "gate": gate_settings, "n_prompts": m.n,
                 "scorer_kind": kinds, "scorer_oof_auroc": scorer_auroc,
                 "cascade_plan": plan_summary,
                 "familiarity": familiarity.settings() if familiarity else None},
    )


def plan_starts(p: np.ndarray, tier_cost: np.ndarray, skip: Sequence[float],
                cost_guard: bool) -> np.ndarray:
    """`plan_cascade` over a matrix of gate probabilities [n, t] (familiar prompts): starts [n]."""
    n, t = p.shape
    start = np.zeros(n, dtype=int)
    for j, s in enumerate(skip[: t - 1]):
        start = np.where((start == j) & (p[:, j] < s), j + 1, start)
    if cost_guard:
        # expected climb cost from each possible start s: Σ_{i≥s} c_i · Π_{s≤j<i} (1 − p_j)
        expected = np.zeros((n, t))
        for s in range(t):
            reach = np.ones(n)
            for i in range(s, t):
                expected[:, s] += reach * tier_cost[i]
                if i < t - 1:
                    reach = reach * (1.0 - p[:, i])
        at_start = expected[np.arange(n), start]
        start = np.where((start < t - 1) & (at_start >= tier_cost[-1]), t - 1, start)
    return start


def fit_cascade_plan(scores: np.ndarray, gate_p: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                     experts: Sequence[str], point: OperatingPoint, *, fallback: str,
                     grid: int = 11, tol: float = PLAN_TOLERANCE) -> tuple[CascadePlanSettings, dict]:
    """Where the served cascade starts: per-tier skip thresholds on the gate's out-of-fold
    P(correct) and the expected-cost guard, searched on calib for the least cost whose accuracy
    stays within `tol` of the plain cascade's (the last tier is never skipped)."""
    cols = [list(experts).index(e) for e in point.order]
    s, y, c, p = scores[:, cols], correct[:, cols], cost[:, cols], gate_p[:, cols]
    tier_cost = c.mean(axis=0)
    _, plain_ok, plain_spent = replay_cascade(s, y, c, point.thresholds)
    floor = float(plain_ok.mean()) - tol
    best = (float(plain_ok.mean()), float(plain_spent.mean()), (0.0,) * (len(cols) - 1), False)
    grids = [np.unique(np.concatenate([[0.0], np.quantile(p[:, j], np.linspace(0, 0.5, grid))]))
             for j in range(len(cols) - 1)]
    for guard in (False, True):
        for skip in itertools.product(*grids):
            start = plan_starts(p, tier_cost, skip, guard)
            _, ok, spent = replay_planned_cascade(s, y, c, point.thresholds, start)
            acc, mean_cost = float(ok.mean()), float(spent.mean())
            if acc >= floor - 1e-12 and mean_cost < best[1] - 1e-12:
                best = (acc, mean_cost, tuple(float(v) for v in skip), guard)
    acc, mean_cost, skip, guard = best
    plan = CascadePlanSettings(tuple(point.order), skip, guard, fallback)
    return plan, {"order": list(point.order), "skip_thresholds": list(skip), "cost_guard": guard,
                  "fallback": fallback, "calib_accuracy": acc, "calib_cost": mean_cost,
                  "plain_accuracy": float(plain_ok.mean()), "plain_cost": float(plain_spent.mean())}


def _fit_gate_oof(m: ResponseMatrix, x: np.ndarray, default: str, seed: int,
                  progress: Progress | None, folds: int = 5) -> tuple[Gate, np.ndarray]:
    mean_cost = m.mean_cost()
    fold = np.random.default_rng(seed).permutation(m.n) % folds
    oof = np.zeros((m.n, len(m.experts)))
    for f in range(folds):
        tr, te = fold != f, fold == f
        g = fit_gate(x[tr], m.correct[tr], m.experts, mean_cost, seed)
        oof[te] = g.probabilities(x[te])
        if progress:
            progress("gate folds", f + 1, folds)
    gate = fit_gate(x, m.correct, m.experts, mean_cost, seed)
    gate.default = default
    return gate, oof
