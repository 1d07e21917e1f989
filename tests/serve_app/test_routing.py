"""The live router's policies over real HTTP: the same decisions as the offline replay."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.features import HashedPromptFeaturizer, answer_features
from frugalserve.cascade.policy import cascade_step

from tests.serve_app.router_fixture import MAX_TOKENS, PROMPTS, TIERS, engines, request

pytestmark = pytest.mark.slow
LIVE = PROMPTS[::3]  # 20 prompts the artifact was calibrated on


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def art(demo_router):
    return RouterArtifact.load(demo_router)


@pytest.fixture(scope="module")
def offline(art):
    """What the artifact decides for each LIVE prompt, computed without the server."""
    engs = engines()
    feat = HashedPromptFeaturizer()
    dims = art.scorer.models[TIERS[0]].mean.shape[0] - 11
    first = asyncio.run(engs[TIERS[0]].generate([request(p) for p in LIVE]))
    out = {}
    for p, c in zip(LIVE, first):
        x = feat([p])[0]
        score = float(art.scorer.score(TIERS[0], answer_features(p, c.text, c.token_logprobs),
                                       art.projector(x, dims))[0])
        step = cascade_step(0, 2, score, art.cascade.thresholds[0])
        gate = art.gate.choose(x)
        out[p] = {"score": score, "accept": step.accept, "gate": gate.experts[0]}
    return out


def chat(http, text, model="cascade", **extra):
    r = http.post("/v1/chat/completions", json={
        "model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_policies_are_listed(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="x", max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert {"moe", "cascade", "demo-llama", "demo-falcon", "hosted-falcon"} <= ids


def test_live_cascade_makes_the_offline_decisions(http, offline):
    escalated = 0
    for p in LIVE:
        rec = chat(http, p, frugalserve={"sticky": False})["frugalserve"]
        want = offline[p]
        first = rec["runs"][0]
        assert first["expert"] == TIERS[0]
        assert first["score"] == pytest.approx(want["score"], abs=1e-3)
        assert first["accepted"] == want["accept"]
        assert rec["answered_by"] == (TIERS[0] if want["accept"] else TIERS[1])
        assert rec["cost"] == pytest.approx(sum(r["cost"] for r in rec["runs"]))
        escalated += not want["accept"]
        assert rec["escalations"] == (0 if want["accept"] else 1)
    assert 0 < escalated < len(LIVE), "the fixture's threshold should split the prompts"


def test_live_gate_makes_the_offline_choice(http, offline):
    for p in LIVE[:8]:
        rec = chat(http, p, model="moe", frugalserve={"sticky": False})["frugalserve"]
        assert rec["gate_choice"] == [offline[p]["gate"]]
        assert rec["answered_by"] == offline[p]["gate"]
        assert set(rec["gate"]) == set(TIERS)


def test_streaming_through_the_cascade_equals_the_answer(app_url, offline):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="x", max_retries=0)
    for p in (next(q for q in LIVE if offline[q]["accept"]),
              next(q for q in LIVE if not offline[q]["accept"])):
        whole = client.chat.completions.create(
            model="cascade", messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS,
            temperature=0, extra_body={"frugalserve": {"sticky": False}})
        pieces, record = [], None
        for chunk in client.chat.completions.create(
                model="cascade", messages=[{"role": "user", "content": p}],
                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_body={"frugalserve": {"sticky": False}}):
            pieces += [c.delta.content or "" for c in chunk.choices]
            record = (chunk.model_extra or {}).get("frugalserve") or record
        assert "".join(pieces) == whole.choices[0].message.content
        assert record["answered_by"] == whole.model_extra["frugalserve"]["answered_by"]


def test_max_tier_and_forced_expert(http, offline):
    p = next(q for q in LIVE if not offline[q]["accept"])
    rec = chat(http, p, frugalserve={"max_tier": 0, "sticky": False})["frugalserve"]
    assert rec["answered_by"] == TIERS[0] and rec["stop_reason"] == "max_tier"
    rec = chat(http, p, frugalserve={"expert": "demo-falcon"})["frugalserve"]
    assert rec["policy"] == "direct" and rec["answered_by"] == "demo-falcon"
    rec = chat(http, p, model="demo-llama", frugalserve={"policy": "cascade", "sticky": False})
    assert rec["frugalserve"]["policy"] == "cascade"


def test_budget_stops_escalation(http, offline, art):
    p = next(q for q in LIVE if not offline[q]["accept"])
    first_cost = chat(http, p, frugalserve={"max_tier": 0, "sticky": False})["frugalserve"]["cost"]
    cheapest = min(pt.cost for pt in art.frontier)
    budget = max(first_cost * 1.01, cheapest)  # room for tier 0, not for tier 1
    rec = chat(http, p, frugalserve={"budget": budget, "sticky": False})["frugalserve"]
    # the budget picks a cheaper operating point and stops before the second tier
    assert rec["answered_by"] == TIERS[0] and len(rec["runs"]) == 1
    assert rec["cost"] <= budget


@pytest.mark.parametrize("extra, status, code", [
    ({"frugalserve": {"budget": 1e-12}}, 400, "budget_too_low"),
    ({"frugalserve": {"policy": "magic"}}, 400, "unknown_policy"),
    ({"frugalserve": {"max_tier": 7}}, 400, "invalid_value"),
    ({"frugalserve": {"start_tier": 7}}, 400, "invalid_value"),
    ({"frugalserve": {"budget": -1}}, 400, "invalid_value"),
])
def test_bad_routing_options(http, extra, status, code):
    r = http.post("/v1/chat/completions", json={
        "model": "cascade", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}],
        **extra})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    assert chat(http, "after an error")["frugalserve"]["policy"] == "cascade"


def test_conversation_sticks_to_its_tier(http, offline):
    p = next(q for q in LIVE if not offline[q]["accept"])
    first = chat(http, p)
    assert first["frugalserve"]["answered_by"] == TIERS[1]
    easy = next(q for q in LIVE if offline[q]["accept"])
    follow = [{"role": "user", "content": p},
              {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
              {"role": "user", "content": easy}]
    r = http.post("/v1/chat/completions", json={"model": "cascade", "max_tokens": MAX_TOKENS,
                                                "temperature": 0, "messages": follow})
    rec = r.json()["frugalserve"]
    assert rec["start_tier"] == 1 and rec["answered_by"] == TIERS[1]
    # with a session header, any later turn sticks as well
    h = {"X-Session-ID": "conv-42"}
    r1 = http.post("/v1/chat/completions", headers=h, json={
        "model": "cascade", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": p}]})
    assert r1.json()["frugalserve"]["answered_by"] == TIERS[1]
    r2 = http.post("/v1/chat/completions", headers=h, json={
        "model": "cascade", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": easy}]})
    assert r2.json()["frugalserve"]["start_tier"] == 1
    # and asking not to stick routes afresh
    r3 = http.post("/v1/chat/completions", headers=h, json={
        "model": "cascade", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": easy}], "frugalserve": {"sticky": False}})
    assert r3.json()["frugalserve"]["answered_by"] == TIERS[0]


def test_remote_expert_is_a_second_frugalserve(http, app_url):
    direct = http.post("/remote/v1/chat/completions", json={
        "model": "demo-falcon", "max_tokens": 5, "temperature": 0,
        "messages": [{"role": "user", "content": "hello remote"}]}).json()
    via = chat(http, "hello remote", model="hosted-falcon")
    assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert via["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
    run = via["frugalserve"]["runs"][0]
    assert run["cost"] == pytest.approx((run["prompt_tokens"] * 1.0
                                         + run["completion_tokens"] * 2.0) / 1000)


def test_unreachable_remote_fails_fast_and_cleanly(http):
    r = http.post("/v1/chat/completions", json={
        "model": "dead", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "expert_unavailable"
    # refused at once, not given up on after a timeout (that would be a ConnectTimeout or a 504)
    assert "unreachable: ConnectError" in r.json()["error"]["message"]
    assert chat(http, "still serving", model="demo-llama")["model"] == "demo-llama"
