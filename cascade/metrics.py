"""Routing metrics: FrugalGPT's cost saved at parity, RouteLLM's APGR and CPT, AUROC, CIs.

APGR and CPT generalise RouteLLM's definitions from "% of calls to the strong model" to the
normalised cost `x = (cost − cost_weak) / (cost_strong − cost_weak)`, which is the same axis for
two models when the weak one is nearly free, and still means something for three tiers. The
curve is the upper concave hull of the policy's operating points plus the weak (0, 0) and strong
(1, 1) points, since mixing two operating points at random reaches every point between them; a
random router scores 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PARITY_TOLERANCE = 0.005  # "equal accuracy" allows half a point below the reference


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Probability a random correct answer outscores a random wrong one (ties count half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper concave hull of (x, y) points, x ascending."""
    pts = sorted(set(points))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def pgr_curve(costs: Sequence[float], accs: Sequence[float], weak: tuple[float, float],
              strong: tuple[float, float], grid: int = 201) -> tuple[np.ndarray, np.ndarray]:
    (cw, aw), (cs, as_) = weak, strong
    span_c, span_a = (cs - cw) or 1e-12, (as_ - aw) or 1e-12
    pts = [(0.0, 0.0), (1.0, 1.0)]
    for c, a in zip(costs, accs):
        x = (c - cw) / span_c
        if 0.0 <= x <= 1.0:
            pts.append((float(x), float((a - aw) / span_a)))
    hull = _hull(pts)
    xs = np.linspace(0, 1, grid)
    hx, hy = zip(*hull)
    return xs, np.interp(xs, hx, hy)


def apgr(costs, accs, weak, strong) -> float:
    xs, ys = pgr_curve(costs, accs, weak, strong)
    return float(np.trapezoid(ys, xs))


def cpt(costs, accs, weak, strong, target: float) -> float:
    """Smallest normalised cost (in %) at which PGR reaches `target` (0.5 for CPT(50%))."""
    xs, ys = pgr_curve(costs, accs, weak, strong)
    hit = np.nonzero(ys >= target - 1e-12)[0]
    return float(xs[hit[0]] * 100) if len(hit) else 100.0


def cost_saved_at_parity(costs, accs, ref_acc: float, ref_cost: float,
                         tol: float = PARITY_TOLERANCE) -> float | None:
    """1 − (cheapest operating point with accuracy ≥ ref − tol) / ref cost; None if none."""
    ok = [c for c, a in zip(costs, accs) if a >= ref_acc - tol]
    return None if not ok else float(1.0 - min(ok) / ref_cost)


def accuracy_at_cost(costs, accs, max_cost: float) -> float | None:
    ok = [a for c, a in zip(costs, accs) if c <= max_cost + 1e-12]
    return max(ok) if ok else None


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat(indices)` over `n` items."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(resamples)]
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)
