"""How familiar a prompt is: is it phrased, and does it mean, like the calibration prompts?

A router fitted on one kind of traffic knows nothing of prompts unlike it: its gate and scorers
extrapolate, and a cascade climbs every tier before it answers. `Familiarity` has two detectors,
each with a threshold set on calibration prompts held out of its reference set (so about
`1 − quantile` of in-distribution prompts are flagged by each):

- **phrasing**: the share of the prompt's word n-grams (1 to 3 words, over its *shape*: numbers,
  quoted strings and capitalised words masked, since they are content, not phrasing) that occur
  in calibration prompts, kept as a hashed bit set. A sentence embedding puts "Flag colour of
  X?" next to "What colour is the flag of X?"; a small model trained on the second need not
  answer the first.
- **meaning**: the mean cosine distance of the prompt's features (the gate's embedding) to its
  `k` nearest calibration prompts.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_K = 5
DEFAULT_QUANTILE = 0.995
HOLDOUT_SHARE = 0.2  # of the calibration prompts, to set the threshold on
NGRAM_BITS = 1 << 18  # hashed n-gram set: 32 KiB, collisions rare for a few thousand prompts
_QUOTED = re.compile(r'"[^"]*"|\'[^\']*\'')
_TOKEN = re.compile(r"\w+|[^\w\s]")


def shape_tokens(text: str, keep: frozenset[str] = frozenset()) -> list[str]:
    """The prompt's phrasing: words and punctuation, lower-cased, with numbers as `0`, quoted
    strings as `"q"` and capitalised words as `X` unless they are in `keep` (the capitalised
    words common in the calibration prompts: "What", "Reverse", ..., not names)."""
    text = _QUOTED.sub(' "q" ', text)
    out = []
    for tok in _TOKEN.findall(text):
        if tok.isdigit():
            out.append("0")
        elif tok[:1].isupper() and tok not in keep:
            out.append("X")
        else:
            out.append(tok.lower())
    return out


def common_capitalised(texts: Sequence[str], share: float = 0.01) -> frozenset[str]:
    """Capitalised words in at least `share` of the texts (and at least 3)."""
    counts: dict[str, int] = {}
    for t in texts:
        for tok in set(_TOKEN.findall(_QUOTED.sub(" ", t))):
            if tok[:1].isupper():
                counts[tok] = counts.get(tok, 0) + 1
    least = max(3, int(share * len(texts)))
    return frozenset(w for w, c in counts.items() if c >= least)


def ngram_hashes(text: str, keep: frozenset[str] = frozenset(), n_max: int = 3) -> np.ndarray:
    toks = ["<s>", *shape_tokens(text, keep), "</s>"]
    grams = {" ".join(toks[i:i + n]) for n in range(1, n_max + 1) for i in range(len(toks) - n + 1)}
    return np.array([zlib.crc32(g.encode()) % NGRAM_BITS for g in grams], dtype=np.int64)


def ngram_set(texts: Sequence[str], keep: frozenset[str] = frozenset()) -> np.ndarray:
    bits = np.zeros(NGRAM_BITS, dtype=bool)
    for t in texts:
        bits[ngram_hashes(t, keep)] = True
    return np.packbits(bits)


def ngram_coverage(packed: np.ndarray, texts: Sequence[str],
                   keep: frozenset[str] = frozenset()) -> np.ndarray:
    """[n] the share of each text's shape n-grams present in the packed set."""
    bits = np.unpackbits(packed).astype(bool)
    return np.array([float(bits[h].mean()) if len(h := ngram_hashes(t, keep)) else 1.0
                     for t in texts])


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def knn_distance(reference: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row of `x` to its `k` nearest rows of `reference`: [n]."""
    sims = _normalise(x) @ reference.T  # [n, r]
    k = max(1, min(k, reference.shape[0]))
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    return 1.0 - top.mean(axis=1)


@dataclass
class Familiarity:
    reference: np.ndarray  # [r, d] L2-normalised calibration prompt features
    threshold: float  # embedding distance above which a prompt is unfamiliar
    ngrams: np.ndarray  # packed bit set of the calibration prompts' shape n-grams
    coverage_threshold: float  # n-gram coverage under which a prompt is unfamiliar
    keep: frozenset[str] = frozenset()  # capitalised words that are phrasing, not names
    k: int = DEFAULT_K
    quantile: float = DEFAULT_QUANTILE

    def distance(self, prompt_features: np.ndarray) -> np.ndarray:
        return knn_distance(self.reference, prompt_features, self.k)

    def coverage(self, texts: Sequence[str]) -> np.ndarray:
        return ngram_coverage(self.ngrams, texts, self.keep)

    def unfamiliar(self, texts: Sequence[str], prompt_features: np.ndarray) -> np.ndarray:
        return ((self.coverage(texts) < self.coverage_threshold - 1e-12)
                | (self.distance(prompt_features) > self.threshold))

    def settings(self) -> dict:
        return {"k": self.k, "quantile": self.quantile, "threshold": self.threshold,
                "coverage_threshold": self.coverage_threshold,
                "reference_prompts": int(self.reference.shape[0])}


def fit_familiarity(texts: Sequence[str], features: np.ndarray, *, k: int = DEFAULT_K,
                    quantile: float = DEFAULT_QUANTILE, holdout: float = HOLDOUT_SHARE,
                    seed: int = 0) -> Familiarity:
    """Thresholds from a held-out part of the calibration prompts (measured against the rest);
    the served reference sets hold all of them."""
    n = len(texts)
    if n < 10:
        raise ValueError(f"familiarity needs at least 10 calibration prompts, got {n}")
    x = _normalise(features)
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * holdout)))
    held, ref = perm[:cut], perm[cut:]
    d = knn_distance(x[ref], x[held], k)
    ref_texts, held_texts = [texts[i] for i in ref], [texts[i] for i in held]
    ref_keep = common_capitalised(ref_texts)
    cov = ngram_coverage(ngram_set(ref_texts, ref_keep), held_texts, ref_keep)
    keep = common_capitalised(texts)
    return Familiarity(np.unique(x, axis=0).astype(np.float16), float(np.quantile(d, quantile)),
                       ngram_set(texts, keep), float(np.quantile(cov, 1.0 - quantile)), keep, k,
                       quantile)
