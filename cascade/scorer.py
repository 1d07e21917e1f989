"""The cascade's scorer: P(this expert's answer is correct | prompt, answer), per expert.

FrugalGPT fine-tunes DistilBERT on (query, answer); ours is a small MLP over answer features
(token logprobs, length, shape) joined with prompt features, one per expert, fitted on the
calibration matrix. `LogprobScorer` is the untrained baseline (mean token logprob).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from frugalserve.cascade.mlp import MLP, fit_mlp


def join(answer_feats: np.ndarray, prompt_feats: np.ndarray) -> np.ndarray:
    return np.concatenate([np.atleast_2d(answer_feats), np.atleast_2d(prompt_feats)], axis=1)


@dataclass
class Scorer:
    models: dict[str, MLP] = field(default_factory=dict)

    def score(self, expert: str, answer_feats: np.ndarray, prompt_feats: np.ndarray) -> np.ndarray:
        if expert not in self.models:
            raise KeyError(f"the router artifact has no scorer for expert {expert!r}")
        return self.models[expert].predict_proba(join(answer_feats, prompt_feats))[:, 0]


def fit_scorer(expert_feats: dict[str, np.ndarray], prompt_feats: np.ndarray,
               correct: dict[str, np.ndarray], seed: int = 0) -> Scorer:
    return Scorer({
        e: fit_mlp(join(expert_feats[e], prompt_feats), correct[e], hidden=(32,), seed=seed)
        for e in expert_feats
    })


def out_of_fold_scores(answer_feats: np.ndarray, prompt_feats: np.ndarray, correct: np.ndarray,
                       folds: int = 5, seed: int = 0) -> np.ndarray:
    """Scores each prompt got from a scorer that never saw it (for honest threshold search)."""
    n = len(correct)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % folds
    x = join(answer_feats, prompt_feats)
    out = np.zeros(n)
    for f in range(folds):
        tr, te = fold != f, fold == f
        if te.any():
            out[te] = fit_mlp(x[tr], correct[tr], hidden=(32,), seed=seed).predict_proba(x[te])[:, 0]
    return out


class LogprobScorer:
    """Baseline: exp(mean token logprob), the geometric-mean token probability."""

    def score(self, answer_feats: np.ndarray) -> np.ndarray:
        return np.exp(np.atleast_2d(answer_feats)[:, 0])
