"""Features for the scorer and the gate, from plain strings and numbers (numpy only).

- `answer_features`: what an answer's token logprobs and shape say about its correctness.
- `HashedPromptFeaturizer`: the light prompt featurizer (hashed character n-grams), the gate's
  fallback when the sentence-embedding model is not available.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

ANSWER_FEATURES = (
    "logprob_mean", "logprob_min", "logprob_first", "logprob_last", "logprob_sum",
    "completion_tokens", "answer_chars", "answer_is_number", "answer_words",
    "prompt_digits", "prompt_chars",
)
_NUMBER = re.compile(r"^-?\d+$")


def answer_features(prompt: str, answer: str,
                    token_logprobs: Sequence[float] | None) -> np.ndarray:
    token_logprobs = list(token_logprobs or [])
    lps = [float(x) for x in token_logprobs] or [0.0]
    text = answer.strip()
    return np.array([
        float(np.mean(lps)),
        float(np.min(lps)),
        lps[0],
        lps[-1],
        float(np.sum(lps)),
        float(len(token_logprobs)),
        float(len(text)),
        1.0 if _NUMBER.match(text) else 0.0,
        float(len(text.split())),
        float(sum(c.isdigit() for c in prompt)),
        float(len(prompt)),
    ])


def row_answer_features(row: dict) -> np.ndarray:
    """Answer features from a response-matrix row (`token_logprobs` if present, else summary)."""
    lps = row.get("token_logprobs")
    if lps is None and row.get("logprob_mean") is not None:
        n = max(1, int(row.get("completion_tokens", 1)))
        mean = float(row["logprob_mean"])
        lps = [float(row["logprob_first"])] + [mean] * (n - 2) + [float(row["logprob_min"])]
        lps = lps[:n]
    return answer_features(row["prompt"], row["answer"], lps)


class HashedPromptFeaturizer:
    """Character n-gram counts hashed into `dim` buckets, log-scaled and L2-normalised."""

    name = "hashed-ngrams"

    def __init__(self, dim: int = 512, ngram: tuple[int, int] = (1, 3)):
        self.dim, self.ngram = dim, ngram

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            t = f" {text.lower()} "
            for n in range(self.ngram[0], self.ngram[1] + 1):
                for j in range(len(t) - n + 1):
                    out[i, zlib.crc32(t[j:j + n].encode()) % self.dim] += 1.0
        out = np.log1p(out)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)

    def config(self) -> dict:
        return {"name": self.name, "dim": self.dim, "ngram": list(self.ngram)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


class Projector:
    """PCA fitted with numpy's SVD: prompt features → their first `k` principal components."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean, self.components = mean, components  # [d], [k, d]

    @classmethod
    def fit(cls, x: np.ndarray, k: int) -> Projector:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, vt[: min(k, vt.shape[0])])

    def __call__(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
        comps = self.components if k is None else self.components[:k]
        return (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) @ comps.T
