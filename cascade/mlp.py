"""A small MLP classifier trained with scikit-learn and stored as plain arrays (no pickle).

`fit_mlp` trains; `MLP.predict_proba` runs the forward pass in numpy, so a router artifact can be
loaded anywhere without executing stored code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from frugalserve.cascade.features import sigmoid


@dataclass
class MLP:
    """Standardise → ReLU hidden layers → sigmoid outputs (one per label)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return sigmoid(h)  # [n, labels]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"{prefix}.w{i}"] = w
            out[f"{prefix}.b{i}"] = b
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> MLP:
        weights, biases, i = [], [], 0
        while f"{prefix}.w{i}" in arrays:
            weights.append(np.asarray(arrays[f"{prefix}.w{i}"]))
            biases.append(np.asarray(arrays[f"{prefix}.b{i}"]))
            i += 1
        if not weights:
            raise ValueError(f"router artifact has no weights for {prefix!r}")
        return cls(np.asarray(arrays[f"{prefix}.mean"]), np.asarray(arrays[f"{prefix}.scale"]),
                   weights, biases)


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...] = (32,), seed: int = 0,
            alpha: float = 1e-3) -> MLP:
    """Fit on `x` [n, d] and binary labels `y` [n] or [n, k]."""
    # scikit-learn only fits: the router loads and runs an artifact with numpy alone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(int)
    single = y.ndim == 1
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    xs = (x - mean) / scale
    if single and len(np.unique(y)) < 2:
        # One class only: a constant predictor at the observed rate (smoothed).
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        w = np.zeros((x.shape[1], 1))
        b = np.array([np.log(rate / (1 - rate))])
        return MLP(mean, scale, [w], [b])
    # L-BFGS: calibration sets are small (hundreds to a few thousand rows), where it converges
    # in a fraction of SGD's time and needs no learning-rate schedule.
    clf = MLPClassifier(hidden_layer_sizes=hidden, alpha=alpha, solver="lbfgs", max_iter=300,
                        random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, y)
    weights = [np.asarray(w) for w in clf.coefs_]
    biases = [np.asarray(b) for b in clf.intercepts_]
    if not single and weights[-1].shape[1] != y.shape[1]:
        raise ValueError("multi-label fit lost a label column")
    return MLP(mean, scale, weights, biases)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> MLP:
    """One L2-regularised logistic regression per label column, as a zero-hidden-layer `MLP`."""
    from sklearn.linear_model import LogisticRegression  # fitting only, as in fit_mlp

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(int)
    y = y[:, None] if y.ndim == 1 else y
    w = np.zeros((x.shape[1], y.shape[1]))
    b = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        col = y[:, j]
        if col.min() == col.max():  # one class only: the smoothed observed rate
            rate = (col.sum() + 0.5) / (len(col) + 1.0)
            b[j] = np.log(rate / (1 - rate))
            continue
        clf = LogisticRegression(C=c, max_iter=1000).fit(x, col)
        w[:, j], b[j] = clf.coef_[0], clf.intercept_[0]
    return MLP(np.zeros(x.shape[1]), np.ones(x.shape[1]), [w], [b])
