"""The default served path: configs/local.yaml's experts (the zoo) behind the SHIPPED router
(`builtin:router`, MiniLM prompt features), deployed for real and asked over HTTP; its `cascade`
and `moe` decisions must be those of an offline replay of the same artifact with MiniLM and the
tiers run in process."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import pytest
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.features import answer_features
from frugalserve.cascade.policy import plan_cascade
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine
from frugalserve.experts.zoo import tasks as T
from frugalserve.serve_app.config import load_serve_config
from frugalserve.serve_app.routing.featurizers import make_featurizer

from tests.conftest import REPO, _wait_ready

pytestmark = pytest.mark.slow
MAX_TOKENS = 16
PROMPTS = [t.prompt for t in T.generate("test", 18)]  # every domain and difficulty
HELDOUT = [t.prompt for t in T.generate("heldout", 3)]  # phrasings no model or router saw
PROMPTS += HELDOUT
TIE = 1e-3  # a score this close to its threshold may fall either way between two processes


@pytest.fixture(scope="module")
def shipped(serve_http):
    from frugalserve.serve_app.app import build_app
    from ray import serve

    args = copy.deepcopy(load_serve_config(REPO / "configs/local.yaml")["applications"][0]["args"])
    assert args["routing"]["artifact"] == "builtin:router"
    args["gpus"] = "never"
    args["router"] = {"num_cpus": 0.1}
    for e in args["experts"]:
        e["deployment"]["autoscaling"] = {"enabled": False}
    started = time.monotonic()
    serve.run(build_app(args), name="shipped", route_prefix="/shipped")
    _wait_ready(f"{serve_http}/shipped", started, timeout_s=300)
    with httpx.Client(base_url=f"{serve_http}/shipped", timeout=120) as client:
        yield client
    serve.delete("shipped")


@pytest.fixture(scope="module")
def art():
    return RouterArtifact.load(resolve_model_path("builtin:router"))


@pytest.fixture(scope="module")
def replay(art):
    """Per prompt: MiniLM features, the gate's probabilities, and each tier's answer and score."""
    assert art.featurizer["name"] == "minilm"
    feats = make_featurizer(art.featurizer)(PROMPTS)
    out = {p: {"feats": f, "gate": art.gate.probabilities(f)[0], "tiers": {},
               "unfamiliar": bool(art.unfamiliar([p], f)[0])}
           for p, f in zip(PROMPTS, feats)}
    for tier in art.cascade.order:
        engine = TransformersEngine.from_path(resolve_model_path(f"builtin:{tier}"), device="cpu",
                                              dtype="float32")
        done = asyncio.run(engine.generate([GenerationRequest(
            messages=({"role": "user", "content": p},),
            params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)) for p in PROMPTS]))
        for p, c in zip(PROMPTS, done):
            score = art.score(tier, answer_features(p, c.text, c.token_logprobs),
                              out[p]["feats"])[0]
            out[p]["tiers"][tier] = (c.text, float(score))
    return out


def ask(client, prompt, model):
    r = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}], "frugalserve": {"sticky": False}})
    assert r.status_code == 200, r.text
    return r.json()


def test_cascade_decides_as_the_offline_replay(shipped, art, replay):
    order, ths = art.cascade.order, art.cascade.thresholds
    cols = [art.gate.experts.index(e) for e in order]
    answered = []
    for p in PROMPTS:
        body = ask(shipped, p, "cascade")
        rec = body["frugalserve"]
        assert rec["tiers"] == list(order)
        assert rec["familiarity"]["unfamiliar"] == replay[p]["unfamiliar"], p
        plan = plan_cascade(replay[p]["gate"][cols], art.gate.mean_cost[cols],
                            art.plan.skips_for(order), unfamiliar=replay[p]["unfamiliar"],
                            cost_guard=art.plan.cost_guard)
        assert (rec["plan"]["start"], rec["plan"]["reason"]) == (plan.start, plan.reason), p
        for i, run in enumerate(rec["runs"], start=plan.start):
            text, score = replay[p]["tiers"][order[i]]
            assert run["expert"] == order[i]
            assert run["score"] == pytest.approx(score, abs=TIE)
            if i < len(ths) and abs(score - ths[i]) > TIE:
                assert run["accepted"] == (score >= ths[i]), (p, run)
        # the offline walk down the tiers from the planned start ends where the live one did
        rest = list(zip(order, ths))[plan.start:]
        want = next((t for t, th in rest if replay[p]["tiers"][t][1] >= th), order[-1])
        if all(abs(replay[p]["tiers"][t][1] - th) > TIE for t, th in rest):
            assert rec["answered_by"] == want, p
        if replay[p]["unfamiliar"]:  # the strongest tier answers at once, nothing climbs
            assert plan.reason == "unfamiliar" and [r["expert"] for r in rec["runs"]] == [order[-1]]
        assert body["choices"][0]["message"]["content"] == replay[p]["tiers"][rec["answered_by"]][0]
        answered.append(rec["answered_by"])
    assert order[0] in answered and set(answered) - {order[0]}, answered  # accepts and escalates


def test_moe_chooses_as_the_offline_gate(shipped, art, replay):
    chosen = []
    for p in PROMPTS:
        rec = ask(shipped, p, "moe")["frugalserve"]
        probs = replay[p]["gate"]
        assert rec["gate"] == pytest.approx(dict(zip(art.gate.experts, probs.round(4))), abs=2e-4)
        want = (art.plan.fallback if replay[p]["unfamiliar"]
                else art.gate.choose(replay[p]["feats"]).experts[0])
        assert rec["gate_choice"] == [want] and rec["answered_by"] == want, p
        chosen.append(want)
    assert len(set(chosen)) > 1, chosen  # the gate does route, not always to one expert
