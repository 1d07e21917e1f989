"""Replay a router artifact on a response matrix and measure it against its peers.

Everything replays from the matrix (no inference): the cascade at its served operating point and
along its calibrated frontier, the MoE gate along a cost-weight sweep, each single expert, random
mixing of the cheapest and largest tier, and the oracle (cheapest correct expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.calibrate import answer_feature_matrix
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.cascade.metrics import (
    accuracy_at_cost,
    apgr,
    auroc,
    bootstrap_ci,
    cost_saved_at_parity,
    cpt,
)
from frugalserve.cascade.policy import replay_cascade, replay_gate

GATE_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


def scores_for(art: RouterArtifact, m: ResponseMatrix, prompt_feats: np.ndarray) -> np.ndarray:
    feats = answer_feature_matrix(m)
    return np.stack([art.score(e, feats[e], prompt_feats) for e in m.experts], axis=1)


def cascade_outcome(m: ResponseMatrix, scores: np.ndarray, order: Sequence[str],
                    thresholds: Sequence[float]):
    cols = [m.column(e) for e in order]
    answered, ok, spent = replay_cascade(scores[:, cols], m.correct[:, cols], m.cost[:, cols],
                                         thresholds)
    return np.array(cols)[answered], ok, spent


def gate_outcome(art: RouterArtifact, m: ResponseMatrix, probs: np.ndarray, weight: float):
    chosen = replay_gate(art.gate.experts, probs, art.gate.mean_cost, cost_weight=weight,
                         floor=art.gate.floor, default=art.gate.default or art.gate.experts[-1])
    cols = np.array([m.column(art.gate.experts[i]) for i in chosen], dtype=int)
    idx = np.arange(m.n)
    return cols, m.correct[idx, cols], m.cost[idx, cols]


def _policy_block(ok: np.ndarray, spent: np.ndarray, curve: list[tuple[float, float]],
                  best: tuple[str, float, float], weak: tuple[float, float],
                  strong: tuple[float, float], resamples: int, seed: int) -> dict:
    acc, cost = float(ok.mean()), float(spent.mean())
    _, best_acc, best_cost = best
    costs, accs = [c for c, _ in curve], [a for _, a in curve]
    saved = 1.0 - cost / best_cost
    n = len(ok)
    return {
        "accuracy": acc,
        "accuracy_ci95": bootstrap_ci(lambda i: ok[i].mean(), n, resamples, seed),
        "cost": cost,
        "cost_ci95": bootstrap_ci(lambda i: spent[i].mean(), n, resamples, seed),
        "best_single": best[0],
        "best_single_accuracy": best_acc,
        "best_single_cost": best_cost,
        "cost_saved_at_parity": saved if acc >= best_acc - 0.005 else None,
        "cost_saved": saved,
        "parity": bool(acc >= best_acc - 0.005),
        "frontier_cost_saved_at_parity": cost_saved_at_parity(costs, accs, best_acc, best_cost),
        "accuracy_at_best_single_cost": accuracy_at_cost(costs, accs, best_cost),
        "apgr": apgr(costs, accs, weak, strong),
        "cpt50": cpt(costs, accs, weak, strong, 0.5),
        "cpt80": cpt(costs, accs, weak, strong, 0.8),
        "curve": [{"cost": c, "accuracy": a} for c, a in curve],
    }


def evaluate_router(art: RouterArtifact, m: ResponseMatrix, prompt_feats: np.ndarray, *,
                    tiers: Sequence[str] | None = None, resamples: int = 1000,
                    seed: int = 0) -> dict:
    tiers = list(tiers or art.cascade.order)
    missing = [e for e in art.experts if e not in m.experts]
    if missing:
        raise ValueError(f"the matrix lacks experts the router uses: {missing}")
    if m.experts != art.experts:
        m = m.select(art.experts)  # extra columns (e.g. a yardstick model) are not routed to
    scores = scores_for(art, m, prompt_feats)
    probs = art.gate.probabilities(prompt_feats)
    acc, cost = m.accuracy(), m.mean_cost()
    singles = {e: {"accuracy": float(acc[j]), "cost": float(cost[j])}
               for j, e in enumerate(m.experts)}
    by_cost = sorted(tiers, key=lambda e: singles[e]["cost"])
    weak = (singles[by_cost[0]]["cost"], singles[by_cost[0]]["accuracy"])
    strong = (singles[by_cost[-1]]["cost"], singles[by_cost[-1]]["accuracy"])
    best_name = max(m.experts, key=lambda e: (singles[e]["accuracy"], -singles[e]["cost"]))
    best = (best_name, singles[best_name]["accuracy"], singles[best_name]["cost"])

    # cascade: the served point, and the calibrated frontier replayed on this matrix
    cols, ok, spent = cascade_outcome(m, scores, art.cascade.order, art.cascade.thresholds)
    curve = []
    for p in art.frontier:
        _, pok, pspent = cascade_outcome(m, scores, p.order, p.thresholds)
        curve.append((float(pspent.mean()), float(pok.mean())))
    report: dict[str, Any] = {"cascade": _policy_block(ok, spent, curve, best, weak, strong, resamples, seed)}
    report["cascade"].update({
        "order": list(art.cascade.order), "thresholds": list(art.cascade.thresholds),
        "answered_by": {e: int((cols == m.column(e)).sum()) for e in art.cascade.order},
        "mean_calls": float(np.mean([list(art.cascade.order).index(m.experts[c]) + 1
                                     for c in cols])),
    })

    # MoE gate: the served weight, and a sweep of cost weights for its curve
    gcols, gok, gspent = gate_outcome(art, m, probs, art.gate.cost_weight)
    gcurve = []
    for w in GATE_WEIGHTS:
        _, wok, wspent = gate_outcome(art, m, probs, w)
        gcurve.append((float(wspent.mean()), float(wok.mean())))
    report["moe"] = _policy_block(gok, gspent, gcurve, best, weak, strong, resamples, seed)
    solvable = m.correct.any(axis=1)
    report["moe"].update({
        "cost_weight": art.gate.cost_weight,
        "expert_choice_accuracy": float(gok[solvable].mean()) if solvable.any() else None,
        "solvable_prompts": int(solvable.sum()),
        "chosen": {e: int((gcols == j).sum()) for j, e in enumerate(m.experts)},
    })

    # peers
    idx = np.arange(m.n)
    oracle_cost = np.where(m.correct, m.cost, np.inf)
    oracle_col = np.where(solvable, oracle_cost.argmin(axis=1), m.cost.argmin(axis=1))
    report["single"] = singles
    report["oracle"] = {"accuracy": float(m.correct[idx, oracle_col].mean()),
                        "cost": float(m.cost[idx, oracle_col].mean())}
    report["random_mix"] = {"from": by_cost[0], "to": by_cost[-1], "apgr": 0.5,
                            "points": [{"share_to": s, "cost": weak[0] + s * (strong[0] - weak[0]),
                                        "accuracy": weak[1] + s * (strong[1] - weak[1])}
                                       for s in np.linspace(0, 1, 11)]}
    report["scorer_auroc"] = {e: auroc(scores[:, j], m.correct[:, j])
                              for j, e in enumerate(m.experts)}
    report["logprob_auroc"] = {
        e: auroc(np.array([r[j]["logprob_mean"] for r in m.rows]), m.correct[:, j])
        for j, e in enumerate(m.experts)}
    report["n_prompts"] = m.n
    report["tiers"] = tiers
    report["weak"], report["strong"] = by_cost[0], by_cost[-1]
    return report
