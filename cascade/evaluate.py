"""Replay a router artifact on a response matrix and measure it against its peers.

Everything replays from the matrix (no inference): the cascade at its served operating point and
along its calibrated frontier, the MoE gate along a cost-weight sweep, each single expert, random
mixing of the cheapest and largest tier, and the oracle (cheapest correct expert). The served
policies replay as the router runs them: unfamiliar prompts go to the fallback, the cascade starts
where its plan says. `mixes` replays them on shifted traffic (one domain only, all-hard) and
reports cost relative to the strongest tier: the no-regret check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.calibrate import answer_feature_matrix, plan_starts
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.cascade.metrics import (
    accuracy_at_cost,
    apgr,
    auroc,
    bootstrap_ci,
    cost_saved_at_parity,
    cpt,
)
from frugalserve.cascade.policy import (
    replay_cascade,
    replay_gate,
    replay_planned_cascade,
)

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


def gate_outcome(art: RouterArtifact, m: ResponseMatrix, probs: np.ndarray, weight: float,
                 unfamiliar: np.ndarray | None = None):
    chosen = replay_gate(art.gate.experts, probs, art.gate.mean_cost, cost_weight=weight,
                         floor=art.gate.floor, default=art.gate.default or art.gate.experts[-1])
    cols = np.array([m.column(art.gate.experts[i]) for i in chosen], dtype=int)
    if unfamiliar is not None and art.plan is not None:
        cols = np.where(unfamiliar, m.column(art.plan.fallback), cols)
    idx = np.arange(m.n)
    return cols, m.correct[idx, cols], m.cost[idx, cols]


def planned_cascade_outcome(art: RouterArtifact, m: ResponseMatrix, scores: np.ndarray,
                            probs: np.ndarray, unfamiliar: np.ndarray, order: Sequence[str],
                            thresholds: Sequence[float]):
    """The cascade as the router runs it: `plan_cascade` per prompt, then the climb."""
    cols = [m.column(e) for e in order]
    if art.plan is None:
        out_cols, ok, spent = cascade_outcome(m, scores, order, thresholds)
        calls = np.array([cols.index(c) + 1 for c in out_cols])
        return out_cols, ok, spent, calls
    gate_cols = [art.gate.experts.index(e) for e in order]
    tier_cost = art.gate.mean_cost[gate_cols]
    skips = art.plan.skips_for(tuple(order))
    p = probs[:, gate_cols]
    start = plan_starts(p, tier_cost, skips, art.plan.cost_guard)
    fallback_in_order = art.plan.fallback in order
    if fallback_in_order:
        start = np.where(unfamiliar, list(order).index(art.plan.fallback), start)
    answered, ok, spent = replay_planned_cascade(scores[:, cols], m.correct[:, cols],
                                                 m.cost[:, cols], thresholds, start)
    out_cols = np.array(cols)[answered]
    calls = answered - start + 1
    if not fallback_in_order:
        f = m.column(art.plan.fallback)
        out_cols = np.where(unfamiliar, f, out_cols)
        ok = np.where(unfamiliar, m.correct[:, f], ok)
        spent = np.where(unfamiliar, m.cost[:, f], spent)
        calls = np.where(unfamiliar, 1, calls)
    return out_cols, ok, spent, calls


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
    unfamiliar = art.unfamiliar(m.prompts, prompt_feats)
    acc, cost = m.accuracy(), m.mean_cost()
    singles = {e: {"accuracy": float(acc[j]), "cost": float(cost[j])}
               for j, e in enumerate(m.experts)}
    by_cost = sorted(tiers, key=lambda e: singles[e]["cost"])
    weak = (singles[by_cost[0]]["cost"], singles[by_cost[0]]["accuracy"])
    strong = (singles[by_cost[-1]]["cost"], singles[by_cost[-1]]["accuracy"])
    best_name = max(m.experts, key=lambda e: (singles[e]["accuracy"], -singles[e]["cost"]))
    best = (best_name, singles[best_name]["accuracy"], singles[best_name]["cost"])

    # cascade: the served point, and the calibrated frontier replayed on this matrix
    cols, ok, spent, calls = planned_cascade_outcome(art, m, scores, probs, unfamiliar,
                                                     art.cascade.order, art.cascade.thresholds)
    curve = []
    for p in art.frontier:
        _, pok, pspent, _ = planned_cascade_outcome(art, m, scores, probs, unfamiliar, p.order,
                                                    p.thresholds)
        curve.append((float(pspent.mean()), float(pok.mean())))
    report: dict[str, Any] = {"cascade": _policy_block(ok, spent, curve, best, weak, strong, resamples, seed)}
    _, plain_ok, plain_spent = cascade_outcome(m, scores, art.cascade.order, art.cascade.thresholds)
    report["cascade_plain"] = {"accuracy": float(plain_ok.mean()), "cost": float(plain_spent.mean())}
    report["cascade"].update({
        "order": list(art.cascade.order), "thresholds": list(art.cascade.thresholds),
        "answered_by": {e: int((cols == m.column(e)).sum()) for e in m.experts
                        if (cols == m.column(e)).any()},
        "mean_calls": float(calls.mean()),
        "unfamiliar": int(unfamiliar.sum()),
    })

    # MoE gate: the served weight, and a sweep of cost weights for its curve
    gcols, gok, gspent = gate_outcome(art, m, probs, art.gate.cost_weight, unfamiliar)
    gcurve = []
    for w in GATE_WEIGHTS:
        _, wok, wspent = gate_outcome(art, m, probs, w, unfamiliar)
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
    report["scorer_auroc_ci95"] = {
        e: bootstrap_ci(_auroc_of(scores[:, j], m.correct[:, j]), m.n, min(resamples, 200), seed)
        for j, e in enumerate(m.experts)}
    report["logprob_auroc"] = {
        e: auroc(np.array([r[j]["logprob_mean"] for r in m.rows]), m.correct[:, j])
        for j, e in enumerate(m.experts)}
    report["n_prompts"] = m.n
    report["tiers"] = tiers
    report["weak"], report["strong"] = by_cost[0], by_cost[-1]
    report["mixes"] = mixes(m, {"cascade": (ok, spent), "cascade_plain": (plain_ok, plain_spent),
                                "moe": (gok, gspent)}, strong=by_cost[-1])
    return report


def _auroc_of(scores: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], float]:
    def stat(i: np.ndarray) -> float:
        a = auroc(scores[i], labels[i])
        return float("nan") if a is None else a
    return stat


def mix_indices(m: ResponseMatrix) -> dict[str, np.ndarray]:
    """The traffic mixes replayed: all prompts, each domain alone, the hardest difficulty alone."""
    idx = np.arange(m.n)
    out = {"all": idx}
    for d in sorted(set(m.domains)):
        if d:
            out[f"{d} only"] = idx[np.array(m.domains) == d]
    hardest = max((x for x in set(m.difficulties) if x), default="")
    if hardest:
        out["all-hard"] = idx[np.array(m.difficulties) == hardest]
    return {k: v for k, v in out.items() if len(v)}


def mixes(m: ResponseMatrix, outcomes: dict[str, tuple[np.ndarray, np.ndarray]], *, strong: str,
          tolerance: float = 0.005) -> dict:
    """Per mix: each policy's accuracy and cost against the strongest tier's on the same prompts,
    and whether it keeps the no-regret rule (cost ≤ 1.0× at accuracy ≥ strongest − tolerance)."""
    s = m.column(strong)
    out = {}
    for name, idx in mix_indices(m).items():
        ref_acc, ref_cost = float(m.correct[idx, s].mean()), float(m.cost[idx, s].mean())
        block: dict[str, Any] = {"n": int(len(idx)), "strongest": strong,
                                 "strongest_accuracy": ref_acc, "strongest_cost": ref_cost}
        for policy, (ok, spent) in outcomes.items():
            acc, cost = float(ok[idx].mean()), float(spent[idx].mean())
            block[policy] = {"accuracy": acc, "cost": cost, "cost_vs_strongest": cost / ref_cost,
                             "accuracy_delta": acc - ref_acc,
                             "no_regret": bool(cost <= ref_cost * (1 + 1e-9)
                                               and acc >= ref_acc - tolerance)}
        out[name] = block
    return out
