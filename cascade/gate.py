"""The MoE gate: P(expert answers correctly | prompt) for every expert, from prompt features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from frugalserve.cascade.mlp import MLP, fit_logistic
from frugalserve.cascade.policy import GateDecision, gate_choose


@dataclass
class Gate:
    experts: list[str]
    model: MLP
    mean_cost: np.ndarray  # [e] expected cost per request on calibration prompts
    cost_weight: float = 0.0
    floor: float = 0.0
    default: str = ""
    k: int = 1

    def probabilities(self, prompt_features: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(np.atleast_2d(prompt_features))  # [n, e]

    def choose(self, prompt_features: np.ndarray, k: int | None = None) -> GateDecision:
        p = self.probabilities(prompt_features)[0]
        return gate_choose(self.experts, p, self.mean_cost, cost_weight=self.cost_weight,
                           floor=self.floor, default=self.default or self.experts[-1],
                           k=k or self.k)


def fit_gate(features: np.ndarray, correct: np.ndarray, experts: Sequence[str],
             mean_cost: np.ndarray, seed: int = 0) -> Gate:
    """One logistic regression per expert on the prompt features: P(that expert is right)."""
    model = fit_logistic(features, correct.astype(int))
    return Gate(list(experts), model, np.asarray(mean_cost, dtype=float))
