from __future__ import annotations

import numpy as np
import pytest
from frugalserve.cascade.metrics import apgr, auroc, bootstrap_ci, cost_saved_at_parity, cpt


def test_random_mixing_scores_half():
    pts = [(c, 0.5 + 0.3 * (c - 1) / 9) for c in np.linspace(1, 10, 7)]  # on the mixing line
    assert apgr([c for c, _ in pts], [a for _, a in pts], (1, 0.5), (10, 0.8)) == \
        pytest.approx(0.5, abs=1e-6)
    assert cpt([], [], (1, 0.5), (10, 0.8), 0.5) == pytest.approx(50, abs=0.6)


def test_a_cheap_good_point_lifts_apgr_and_lowers_cpt():
    a = apgr([2.0], [0.77], (1, 0.5), (10, 0.8))
    assert a > 0.8
    assert cpt([2.0], [0.77], (1, 0.5), (10, 0.8), 0.8) < 15


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.4
    scores = rng.normal(size=300) + labels * 0.8
    scores[:20] = 0.5  # ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert auroc(scores, np.ones(300, bool)) is None


def test_cost_saved_at_parity():
    assert cost_saved_at_parity([1, 3, 8], [0.6, 0.797, 0.81], 0.8, 10) == pytest.approx(0.7)
    assert cost_saved_at_parity([1], [0.5], 0.8, 10) is None


def test_bootstrap_ci_brackets_the_mean():
    x = np.random.default_rng(0).random(500) < 0.7
    lo, hi = bootstrap_ci(lambda i: x[i].mean(), len(x), 300)
    assert lo < x.mean() < hi and hi - lo < 0.12
