"""Swapping the router artifact while serving, over real HTTP: no request fails under load, the
new decisions appear, a broken artifact is refused and the old one keeps serving."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time

import httpx
import pytest
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.policy import OperatingPoint
from frugalserve.serve_app.routing.cli import deploy

from tests.conftest import TEST_APP_ARGS, _wait_ready
from tests.serve_app.router_fixture import MAX_TOKENS, PROMPTS, TIERS


@pytest.fixture(scope="module")
def swap_app(serve_http, demo_router):
    from frugalserve.serve_app.app import build_app
    from ray import serve

    args = copy.deepcopy(TEST_APP_ARGS)
    args["routing"] = {"artifact": str(demo_router)}
    started = time.monotonic()
    serve.run(build_app(args), name="swap", route_prefix="/swap")
    _wait_ready(f"{serve_http}/swap", started)
    yield f"{serve_http}/swap"
    serve.delete("swap")


@pytest.fixture(scope="module")
def always_top(demo_router, tmp_path_factory):
    """The demo artifact with a threshold no score reaches: every cascade ends at demo-falcon."""
    art = RouterArtifact.load(demo_router)
    art.cascade = OperatingPoint(TIERS, (2.0,), 0.0, art.cascade.cost)
    art.familiarity, art.plan = None, None
    return art.save(tmp_path_factory.mktemp("top") / "router")


def ask(client: httpx.Client, prompt: str) -> dict:
    r = client.post("/v1/chat/completions", json={
        "model": "cascade", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}], "frugalserve": {"sticky": False}})
    assert r.status_code == 200, r.text
    return r.json()["frugalserve"]


def test_hot_swap_under_load(swap_app, demo_router, always_top, tmp_path):
    client = httpx.Client(base_url=swap_app, timeout=120)
    before = [ask(client, p)["answered_by"] for p in PROMPTS[:8]]
    assert TIERS[0] in before  # the demo artifact accepts some first answers
    failures, records, stop = [], [], threading.Event()

    def load():
        with httpx.Client(base_url=swap_app, timeout=120) as c:
            i = 0
            while not stop.is_set():
                try:
                    records.append(ask(c, PROMPTS[i % len(PROMPTS)]))
                except AssertionError as exc:
                    failures.append(str(exc))
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert deploy(swap_app, always_top) == 0  # what `calibrate --deploy URL` does
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not failures and records
    status = client.get("/v1/router").json()
    assert status["artifact"] == str(always_top.resolve()) and status["swaps"] == 1
    after = [ask(client, p) for p in PROMPTS[:8]]
    assert all(r["answered_by"] == TIERS[-1] and r["thresholds"] == [2.0] for r in after)

    # broken candidates are refused with a reason; the swapped-in artifact keeps serving
    broken = tmp_path / "broken"
    shutil.copytree(demo_router, broken)
    doc = json.loads((broken / "router.json").read_text())
    (broken / "router.json").write_text(json.dumps(dict(doc, version=999)))
    foreign = tmp_path / "foreign"
    shutil.copytree(demo_router, foreign)
    (foreign / "router.json").write_text(json.dumps(dict(doc, experts=["demo-llama", "tier-xl"])))
    for path, why in ((broken, "format version 999"), (foreign, "tier-xl"),
                      (tmp_path / "nowhere", "router.json missing")):
        r = client.post("/v1/router", json={"artifact": str(path)})
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "invalid_artifact"
    status = client.get("/v1/router").json()
    assert status["refused"] == 3 and status["swaps"] == 1
    assert ask(client, PROMPTS[0])["answered_by"] == TIERS[-1]
    assert client.post("/v1/router", json={}).status_code == 400
    client.close()
