"""No regret: the start plan, the familiarity detector, and cost on a shifted mix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.calibrate import fit_router
from frugalserve.cascade.evaluate import evaluate_router
from frugalserve.cascade.familiarity import fit_familiarity, shape_tokens
from frugalserve.cascade.features import HashedPromptFeaturizer
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.cascade.policy import expected_climb_cost, plan_cascade, replay_planned_cascade

from .conftest import EXPERTS, SIZES

TIERS = ["tier-s", "tier-m", "tier-l"]
FEAT = HashedPromptFeaturizer()
COSTS = [1.0, 5.0, 20.0]


def test_unfamiliar_prompts_go_straight_to_the_fallback():
    plan = plan_cascade([0.9, 0.9, 0.9], COSTS, (0.5, 0.5), unfamiliar=True)
    assert (plan.start, plan.reason) == (2, "unfamiliar")
    assert plan_cascade([0.9, 0.9, 0.9], COSTS, (), unfamiliar=True, fallback=1).start == 1


def test_tiers_predicted_to_fail_are_skipped():
    assert plan_cascade([0.9, 0.9, 0.9], COSTS, (0.5, 0.5)).reason == "cheapest"
    plan = plan_cascade([0.2, 0.9, 0.9], COSTS, (0.5, 0.5))
    assert (plan.start, plan.reason) == (1, "predicted_fail")
    assert plan_cascade([0.2, 0.3, 0.9], COSTS, (0.5, 0.5), cost_guard=False).start == 2


def test_the_cost_guard_goes_to_the_top_when_climbing_costs_more():
    # P(accept) 0.1 at tiers s and m: expected 1 + 0.9 * 5 + 0.81 * 20 = 21.7 > 20
    assert expected_climb_cost([0.1, 0.1, 1.0], COSTS) == pytest.approx(21.7)
    plan = plan_cascade([0.1, 0.1, 1.0], COSTS, ())
    assert (plan.start, plan.reason) == (2, "cost_guard")
    assert plan_cascade([0.1, 0.1, 1.0], COSTS, (), cost_guard=False).start == 0
    assert plan_cascade([0.9, 0.5, 1.0], COSTS, ()).start == 0  # 1 + 0.5 + 0.5 · 20 · 0.1 < 20


def test_a_planned_replay_pays_only_for_the_tiers_it_runs():
    scores = np.array([[0.1, 0.1, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    correct = np.ones((3, 3), dtype=bool)
    cost = np.tile(COSTS, (3, 1))
    answered, _, spent = replay_planned_cascade(scores, correct, cost, (0.5, 0.5), np.array([2, 0, 1]))
    assert answered.tolist() == [2, 0, 1]
    assert spent.tolist() == [20.0, 1.0, 5.0]


def test_familiarity_flags_other_phrasings_not_new_content():
    rng = np.random.default_rng(0)
    ours = [f"What is {a} + {b}?" for a, b in rng.integers(0, 1000, (200, 2))]
    fam = fit_familiarity(ours, FEAT(ours))
    same = ["What is 123 + 456?", "What is 9 + 99?"]
    other = ["Compute 123 plus 4567.", "9+99=?", "Add 5 and 6."]
    assert not fam.unfamiliar(same, FEAT(same)).any()
    assert fam.unfamiliar(other, FEAT(other)).all()
    assert shape_tokens('Reverse "abc" for Zorbia', frozenset({"Reverse"})) == [
        "reverse", '"', "q", '"', "for", "X"]


def _shifted_rows(n: int) -> list[dict]:
    """Traffic unlike the calibration data: phrased otherwise, and every tier mostly wrong with
    a low logprob (what the zoo does on its held-out phrasings)."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        prompt = f"Kindly evaluate the following, then reply: case #{i} ??"
        for e in EXPERTS:
            ok = bool(e == "tier-l" and rng.random() < 0.2)
            lp = -1.5 + rng.normal(0, 0.2)
            rows.append(dict(id=f"s{i}", expert=e, domain="shifted", difficulty="3",
                             prompt=prompt, answer="42" if ok else "x", correct=ok,
                             logprob_mean=lp, logprob_min=lp - 0.3, logprob_first=lp,
                             prompt_tokens=12, completion_tokens=3, cost=15 * SIZES[e] / 1000))
    return rows


@pytest.fixture(scope="module")
def fitted(calib_matrix):
    """Routers fitted with and without the familiarity detector, by `familiar`."""
    return {f: fit_router(calib_matrix, FEAT(calib_matrix.prompts), tiers=TIERS, familiar=f)
            for f in (True, False)}


@pytest.mark.parametrize("familiar", [True, False])
def test_no_regret_on_a_shifted_mix(fitted, familiar):
    art = fitted[familiar].to_artifact(FEAT.config())
    shifted = ResponseMatrix.from_rows(_shifted_rows(120))
    report = evaluate_router(art, shifted, FEAT(shifted.prompts), tiers=TIERS, resamples=20)
    mix = report["mixes"]["all"]
    if familiar:  # every prompt is unfamiliar: tier-l answers at exactly its own cost
        assert report["cascade"]["unfamiliar"] == shifted.n
        for policy in ("cascade", "moe"):
            assert mix[policy]["no_regret"], mix[policy]
            assert mix[policy]["cost_vs_strongest"] == pytest.approx(1.0)
    else:  # without the detector, the plain cascade climbs every tier and pays for all three
        assert mix["cascade_plain"]["cost_vs_strongest"] > 1.2


def test_a_version_1_artifact_still_loads(fitted, tmp_path):
    path = fitted[True].to_artifact(FEAT.config()).save(tmp_path / "r")
    doc = json.loads((path / "router.json").read_text())
    assert doc["version"] == 2 and doc["familiarity"] and doc["plan"]
    doc.update(version=1)
    del doc["familiarity"], doc["plan"]
    (path / "router.json").write_text(json.dumps(doc))
    old = RouterArtifact.load(path)
    assert old.familiarity is None and old.plan is None
    assert not old.unfamiliar(["anything"], FEAT(["anything"])).any()
