"""`frugalserve calibrate` and `frugalserve eval-router` end to end, on response matrices whose
experts behave as tests/cascade/conftest.py builds them (skill grows with size)."""

from __future__ import annotations

import json

import pytest
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.evaluate import evaluate_router
from frugalserve.cascade.features import HashedPromptFeaturizer
from frugalserve.cascade.matrix import ResponseMatrix

from frugalserve.cli import main
from tests.cascade.conftest import synthetic_rows

TIERS = "tier-s,tier-m,tier-l"


def write_matrix(path, n, seed):
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n, seed)))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    calib = write_matrix(d / "calib.jsonl", 450, seed=1)
    code = main(["calibrate", "--matrix", str(calib), "--out", str(d / "router"),
                 "--featurizer", "hashed-ngrams", "--tiers", TIERS])
    assert code == 0
    return d


def test_calibrate_writes_an_artifact_the_router_can_load(calibrated):
    art = RouterArtifact.load(calibrated / "router")
    assert art.featurizer["name"] == "hashed-ngrams"
    assert set(art.cascade.order) <= set(TIERS.split(",")) and art.cascade.order
    assert len(art.cascade.thresholds) == len(art.cascade.order) - 1
    assert art.meta["tiers"] == TIERS.split(",")
    # the served cascade reaches the best tier's calibration accuracy, a quarter point inside parity
    assert art.cascade.accuracy >= max(art.meta["tier_accuracy"].values()) - 0.0025 - 1e-9
    assert art.operating_point(None) == art.cascade


def test_calibration_report_is_the_in_sample_replay(calibrated):
    report_dir = calibrated / "router" / "calibration-report"
    report = json.loads((report_dir / "report.json").read_text())
    art = RouterArtifact.load(calibrated / "router")
    m = ResponseMatrix.load(calibrated / "calib.jsonl")
    again = evaluate_router(art, m, HashedPromptFeaturizer()(m.prompts), tiers=TIERS.split(","),
                            resamples=10)
    assert report["n_prompts"] == 450
    assert report["cascade"]["accuracy"] == pytest.approx(again["cascade"]["accuracy"])
    assert report["moe"]["cost"] == pytest.approx(again["moe"]["cost"])
    assert "| cascade |" in (report_dir / "report.md").read_text()
    for png in ("frontier.png", "pgr.png"):
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_eval_router_reports_held_out_prompts(calibrated, capsys):
    test = write_matrix(calibrated / "test.jsonl", 300, seed=2)
    out = calibrated / "report"
    assert main(["eval-router", "--matrix", str(test), "--router", str(calibrated / "router"),
                 "--out", str(out), "--resamples", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    c = report["cascade"]
    assert report["n_prompts"] == 300 and sum(c["answered_by"].values()) == 300
    assert c["cost"] < c["best_single_cost"] and c["apgr"] > 0.5  # cheaper than tier-l, beats mixing
    assert f"APGR {c['apgr']:.3f}" in capsys.readouterr().out


def test_cli_errors_name_the_problem(calibrated, tmp_path, capsys):
    assert main(["eval-router", "--matrix", str(calibrated / "calib.jsonl"), "--router",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "router.json missing" in capsys.readouterr().err
    assert main(["calibrate", "--matrix", str(calibrated / "calib.jsonl"), "--out",
                 str(tmp_path / "r"), "--featurizer", "hashed-ngrams", "--tiers", TIERS,
                 "--budget", "1e-9"]) == 2
    assert "below the cheapest operating point" in capsys.readouterr().err
    assert not (tmp_path / "r" / "router.json").exists()
