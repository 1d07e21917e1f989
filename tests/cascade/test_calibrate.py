from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.cascade.calibrate import fit_router, threshold_for_share
from frugalserve.cascade.evaluate import evaluate_router
from frugalserve.cascade.features import HashedPromptFeaturizer

TIERS = ["tier-s", "tier-m", "tier-l"]
FEAT = HashedPromptFeaturizer()


@pytest.fixture(scope="module")
def fitted(calib_matrix):
    return fit_router(calib_matrix, FEAT(calib_matrix.prompts), tiers=TIERS)


def test_frontier_is_pareto_and_the_served_point_reaches_parity(fitted):
    costs = [p.cost for p in fitted.frontier]
    accs = [p.accuracy for p in fitted.frontier]
    assert costs == sorted(costs) and accs == sorted(accs)
    best = max(fitted.summary["tier_accuracy"].values())
    assert fitted.cascade.accuracy >= best - 0.0025 - 1e-9  # a quarter point inside parity


def test_budget_is_respected_on_calibration(calib_matrix):
    budget = calib_matrix.mean_cost()[calib_matrix.column("tier-m")]
    r = fit_router(calib_matrix, FEAT(calib_matrix.prompts), tiers=TIERS, budget=budget)
    assert r.cascade.cost <= budget + 1e-9


def test_impossible_budget_is_a_clear_error(calib_matrix):
    with pytest.raises(ValueError, match="below the cheapest operating point"):
        fit_router(calib_matrix, FEAT(calib_matrix.prompts), tiers=TIERS, budget=1e-9)


def test_unknown_tier_is_named(calib_matrix):
    with pytest.raises(ValueError, match="tier-xl"):
        fit_router(calib_matrix, FEAT(calib_matrix.prompts), tiers=["tier-s", "tier-xl"])


def test_quantile_threshold_hits_the_share():
    scores = np.random.default_rng(0).random(1000)
    t = threshold_for_share(scores, 0.3)
    assert (scores < t).mean() == pytest.approx(0.3, abs=0.01)


def test_held_out_evaluation_beats_random_and_saves_cost(fitted, test_matrix, tmp_path):
    art = fitted.to_artifact(FEAT.config())
    art.save(tmp_path / "r")
    loaded = RouterArtifact.load(tmp_path / "r")
    x = FEAT(test_matrix.prompts)
    a = evaluate_router(art, test_matrix, x, tiers=TIERS, resamples=100)
    b = evaluate_router(loaded, test_matrix, x, tiers=TIERS, resamples=100)
    assert a["cascade"]["accuracy"] == b["cascade"]["accuracy"]  # the artifact round-trips
    assert a["cascade"]["apgr"] > 0.6  # clearly better than random mixing (0.5)
    assert a["cascade"]["cost"] < a["cascade"]["best_single_cost"]
    # answers are noisy coin flips per expert, so "the" right expert is not always predictable;
    # the gate must still do as well as always asking the largest tier, for less
    assert a["moe"]["accuracy"] >= a["single"]["tier-l"]["accuracy"] - 0.03
    assert a["moe"]["cost"] < a["single"]["tier-l"]["cost"]
    assert a["oracle"]["accuracy"] >= a["moe"]["accuracy"]
    for key in ("accuracy", "cost", "best_single_accuracy", "best_single_cost",
                "cost_saved_at_parity", "apgr", "cpt50", "cpt80"):
        assert key in a["cascade"] and key in a["moe"]


def test_artifact_of_another_version_is_refused(fitted, tmp_path):
    import json

    path = fitted.to_artifact(FEAT.config()).save(tmp_path / "r")
    doc = json.loads((path / "router.json").read_text())
    doc["version"] = 999
    (path / "router.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="version 999"):
        RouterArtifact.load(path)
    with pytest.raises(ArtifactError, match="router.json missing"):
        RouterArtifact.load(tmp_path / "nowhere")


def test_budget_picks_an_operating_point(fitted):
    art = fitted.to_artifact(FEAT.config())
    cheap = art.frontier[0].cost
    assert art.operating_point(cheap * 1.0001).cost <= cheap * 1.0001
    with pytest.raises(ArtifactError, match="below the cheapest"):
        art.operating_point(cheap / 10)


def test_cascade_package_imports_neither_torch_nor_ray():
    code = ("import sys, frugalserve.cascade.calibrate, frugalserve.cascade.evaluate, "
            "frugalserve.cascade.artifact; "
            "print([m for m in ('torch', 'ray', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_runtime_artifact_needs_no_fitting_code():
    code = ("import sys, frugalserve.cascade.artifact; print([m for m in ('frugalserve.cascade"
            ".calibrate', 'frugalserve.cascade.evaluate', 'sklearn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
