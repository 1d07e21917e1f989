"""The cascade's scorer: P(this expert's answer is correct | prompt, answer), per expert.

FrugalGPT fine-tunes DistilBERT on (query, answer); ours is a small MLP over answer features
(token logprobs, length, shape) joined with prompt features, one per expert, fitted on the
calibration matrix. Per expert, `select_scorer` keeps the MLP or a logistic curve of the
mean token logprob, whichever ranks held-out answers better.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from frugalserve.cascade.metrics import auroc
from frugalserve.cascade.mlp import MLP, fit_logistic, fit_mlp


def join(answer_feats: np.ndarray, prompt_feats: np.ndarray) -> np.ndarray:
    return np.concatenate([np.atleast_2d(answer_feats), np.atleast_2d(prompt_feats)], axis=1)


@dataclass
class Scorer:
    models: dict[str, MLP] = field(default_factory=dict)

    def score(self, expert: str, answer_feats: np.ndarray, prompt_feats: np.ndarray) -> np.ndarray:
        if expert not in self.models:
            raise KeyError(f"the router artifact has no scorer for expert {expert!r}")
        return self.models[expert].predict_proba(join(answer_feats, prompt_feats))[:, 0]


SCORER_KINDS = ("mlp", "logprob")
MLP_ALPHA = 10.0  # strong L2: calibration sets are small, and a weakly regularised MLP
# saturates its outputs at 0/1, which leaves threshold search nothing to rank by


def fit_one(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0) -> MLP:
    """`mlp`: over answer + prompt features; `logprob`: a logistic curve of the mean token
    logprob alone (feature 0), stored as the same zero-hidden-layer `MLP`."""
    if kind == "mlp":
        return fit_mlp(x, y, hidden=(32,), seed=seed, alpha=MLP_ALPHA)
    one = fit_logistic(x[:, :1], y)
    w = np.zeros((x.shape[1], 1))
    w[0, 0] = one.weights[0][0, 0]
    return MLP(np.zeros(x.shape[1]), np.ones(x.shape[1]), [w], [one.biases[0]])


def fit_scorer(expert_feats: dict[str, np.ndarray], prompt_feats: np.ndarray,
               correct: dict[str, np.ndarray], kinds: dict[str, str] | None = None,
               seed: int = 0) -> Scorer:
    kinds = kinds or {}
    return Scorer({
        e: fit_one(kinds.get(e, "mlp"), join(expert_feats[e], prompt_feats), correct[e], seed)
        for e in expert_feats
    })


def out_of_fold_scores(answer_feats: np.ndarray, prompt_feats: np.ndarray, correct: np.ndarray,
                       kind: str = "mlp", folds: int = 5, seed: int = 0) -> np.ndarray:
    """Scores each prompt got from a scorer that never saw it (for honest threshold search)."""
    n = len(correct)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % folds
    x = join(answer_feats, prompt_feats)
    out = np.zeros(n)
    for f in range(folds):
        tr, te = fold != f, fold == f
        if te.any():
            out[te] = fit_one(kind, x[tr], correct[tr], seed).predict_proba(x[te])[:, 0]
    return out


def select_scorer(answer_feats: np.ndarray, prompt_feats: np.ndarray, correct: np.ndarray,
                  seed: int = 0) -> tuple[str, np.ndarray, dict[str, float | None]]:
    """The scorer kind that ranks held-out answers best (out-of-fold AUROC; the first of
    `SCORER_KINDS` on ties): (kind, its out-of-fold scores, AUROC of every kind)."""
    best: tuple[str, float | None, np.ndarray] | None = None
    aurocs: dict[str, float | None] = {}
    for kind in SCORER_KINDS:
        s = out_of_fold_scores(answer_feats, prompt_feats, correct, kind=kind, seed=seed)
        aurocs[kind] = a = auroc(s, correct)
        if best is None or (a or 0.0) > (best[1] or 0.0):
            best = (kind, a, s)
    assert best is not None
    return best[0], best[2], aurocs
