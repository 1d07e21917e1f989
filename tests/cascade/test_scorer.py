"""Scorers and gate settings on synthetic data whose right answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from frugalserve.cascade.calibrate import choose_gate_settings
from frugalserve.cascade.features import ANSWER_FEATURES
from frugalserve.cascade.gate import Gate
from frugalserve.cascade.metrics import auroc
from frugalserve.cascade.mlp import MLP, fit_logistic, fit_mlp
from frugalserve.cascade.scorer import fit_one, select_scorer

N = 300


def features(seed: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, len(ANSWER_FEATURES))), rng.normal(size=(N, 16)), rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logprob_scorer_is_chosen_when_only_the_logprob_speaks(seed):
    answer, prompt, rng = features(seed)
    # correctness follows the mean token logprob (feature 0) alone, noisily; the other 26 inputs
    # are noise, so the MLP can only overfit them
    correct = rng.random(N) < 1 / (1 + np.exp(-2 * answer[:, 0]))
    kind, oof, aurocs = select_scorer(answer, prompt, correct)
    assert kind == "logprob"
    assert aurocs["logprob"] > aurocs["mlp"]
    assert auroc(oof, correct) == pytest.approx(aurocs["logprob"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_scorer_is_chosen_when_the_answer_depends_on_the_prompt(seed):
    answer, prompt, _ = features(seed)
    correct = prompt[:, 0] * prompt[:, 1] > 0  # an XOR of two prompt features; logprob is noise
    kind, _, aurocs = select_scorer(answer, prompt, correct)
    assert kind == "mlp"
    assert aurocs["mlp"] > 0.7 and abs(aurocs["logprob"] - 0.5) < 0.12


def test_mlp_learns_what_a_linear_model_cannot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2))
    y = x[:, 0] * x[:, 1] > 0
    mlp, linear = fit_mlp(x[:400], y[:400], hidden=(32,), alpha=1e-3), fit_logistic(x[:400], y[:400])
    held = slice(400, None)
    assert ((mlp.predict_proba(x[held])[:, 0] > 0.5) == y[held]).mean() > 0.9
    assert ((linear.predict_proba(x[held])[:, 0] > 0.5) == y[held]).mean() < 0.7


def test_mlp_round_trips_through_plain_arrays():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 5)), rng.random(200) < 0.4
    mlp = fit_one("mlp", x, y)
    again = MLP.from_arrays(mlp.to_arrays("s"), "s")
    np.testing.assert_array_equal(again.predict_proba(x), mlp.predict_proba(x))
    p = mlp.predict_proba(x)[:, 0]
    assert ((0 < p) & (p < 1)).all() and p.std() > 0.01  # strong L2: no saturation at 0 or 1


def test_logprob_scorer_is_monotone_in_the_mean_logprob():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, len(ANSWER_FEATURES)))
    y = rng.random(300) < 1 / (1 + np.exp(-3 * x[:, 0]))
    model = fit_one("logprob", x, y)
    grid = np.zeros((5, x.shape[1]))
    grid[:, 0] = np.linspace(-2, 2, 5)
    grid[:, 1:] = 7.0  # every other input is ignored
    p = model.predict_proba(grid)[:, 0]
    assert (np.diff(p) > 0).all()


def _gate(probs_cheap: float, probs_dear: float) -> tuple[Gate, np.ndarray]:
    gate = Gate(["cheap", "dear"], MLP(np.zeros(1), np.ones(1), [np.zeros((1, 2))], [np.zeros(2)]),
                np.array([1.0, 10.0]), default="dear")
    return gate, np.tile([probs_cheap, probs_dear], (50, 1))


def test_gate_cost_weight_stops_where_accuracy_would_drop():
    # cheap is always wrong and the gate knows it (P 0.1 vs 0.9). The dear expert keeps the
    # higher utility while 0.9 - w > 0.1 - w / 10, i.e. w < 0.889: of the searched weights,
    # 0.5 is the largest that keeps every answer right.
    gate, probs = _gate(0.1, 0.9)
    correct = np.tile([False, True], (50, 1))
    settings = choose_gate_settings(gate, probs, correct)
    assert settings["cost_weight"] == 0.5
    assert settings["accuracy"] == 1.0 and settings["cost"] == 10.0
    accs = {w: a for w, a, _ in settings["sweep"]}
    assert accs[1.0] == 0.0  # one step further the gate would send everything to cheap


def test_gate_cost_weight_is_the_largest_when_the_cheap_expert_is_as_good():
    gate, probs = _gate(0.9, 0.9)
    correct = np.ones((50, 2), dtype=bool)
    settings = choose_gate_settings(gate, probs, correct)
    assert settings["cost_weight"] == max(w for w, _, _ in settings["sweep"])
    assert settings["cost"] == 1.0
