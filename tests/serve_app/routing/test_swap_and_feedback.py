"""The live router's operations, over real HTTP: swapping the artifact while serving (no request
fails under load, the new decisions appear, a broken artifact is refused and the old one keeps
serving), the routing log, `POST /v1/feedback`, and `calibrate --from-logs` on that log."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time

import httpx
import pytest
import yaml
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.policy import OperatingPoint
from frugalserve.serve_app.routing.cli import calibrate_main, deploy

from tests.conftest import TEST_APP_ARGS, _wait_ready
from tests.serve_app.router_fixture import MAX_TOKENS, PROMPTS, TIERS


@pytest.fixture(scope="module")
def routing_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "routing.jsonl"


@pytest.fixture(scope="module")
def swap_app(serve_http, demo_router, routing_log):
    from frugalserve.serve_app.app import build_app
    from ray import serve

    args = copy.deepcopy(TEST_APP_ARGS)
    args["routing"] = {"artifact": str(demo_router), "log_path": str(routing_log),
                       "log_text": True}
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


def ask(client: httpx.Client, prompt: str, model: str = "cascade", full: bool = False) -> dict:
    r = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}], "frugalserve": {"sticky": False}})
    assert r.status_code == 200, r.text
    return r.json() if full else r.json()["frugalserve"]


def test_routing_log_and_feedback(swap_app, routing_log, tmp_path):
    client = httpx.Client(base_url=swap_app, timeout=120)
    answered = {}
    for i, p in enumerate(PROMPTS[:24]):
        body = ask(client, p, "cascade" if i % 3 else "moe", full=True)
        answered[body["id"]] = body
    lines = [json.loads(x) for x in routing_log.read_text().splitlines()]
    logged = {x["id"]: x for x in lines if x["type"] == "request"}
    assert set(answered) <= set(logged)
    for rid, body in answered.items():
        line, rec = logged[rid], body["frugalserve"]
        assert line["answered_by"] == rec["answered_by"] and line["policy"] == rec["policy"]
        assert [r["expert"] for r in line["runs"]] == rec["experts"]
        assert line["text"] in PROMPTS and len(line["prompt_hash"]) == 32
        assert len(line["features"]) == 512 and line["latency_s"] > 0
        assert line["cost"] == pytest.approx(rec["cost"])
        last = line["runs"][-1]
        assert last["answer"] == body["choices"][0]["message"]["content"] and last["token_logprobs"]

    for n, rid in enumerate(answered):
        fb = {"score": 1.0} if n % 4 else {"thumbs": "up"}
        r = client.post("/v1/feedback", json={"id": rid, **fb})
        assert r.status_code == 200 and r.json()["recorded"], r.text
    for body, status, code in (({"id": "chatcmpl-nope", "score": 1}, 404, "completion_not_found"),
                               ({"id": next(iter(answered)), "score": 1.5}, 400, None),
                               ({"id": next(iter(answered))}, 400, None),
                               ({"id": next(iter(answered)), "thumbs": "sideways"}, 400, None)):
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == status, (body, r.text)
        assert code is None or r.json()["error"]["code"] == code
    client.close()

    # learn from production: the log's prompts, labelled by their feedback
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "x", "route_prefix": "/", "import_path": "frugalserve.serve_app.app:build_app",
        "args": {"experts": copy.deepcopy(TEST_APP_ARGS["experts"])}}]}))
    out = tmp_path / "from-logs"
    assert calibrate_main(["--from-logs", str(routing_log), "--config", str(config), "--out",
                           str(out), "--featurizer", "hashed-ngrams", "--max-tokens",
                           str(MAX_TOKENS)]) == 0
    art = RouterArtifact.load(out)
    assert art.meta["calibrated_on"] == str(routing_log)
    rows = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == set(answered)


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


def test_calibrate_own_data_through_the_running_application(swap_app, tmp_path):
    """`calibrate --data --url`: the experts answer through the application's HTTP API."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": p, "labels": {"demo-llama": i % 3 != 0, "demo-falcon": i % 2 == 0}}) + "\n"
        for i, p in enumerate(PROMPTS[:20])))
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "x", "route_prefix": "/", "import_path": "frugalserve.serve_app.app:build_app",
        "args": {"experts": copy.deepcopy(TEST_APP_ARGS["experts"])}}]}))
    assert calibrate_main(["--data", str(data), "--config", str(config), "--url", swap_app,
                           "--out", str(tmp_path / "r"), "--featurizer", "hashed-ngrams",
                           "--max-tokens", str(MAX_TOKENS), "--concurrency", "4"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(r["token_logprobs"] and r["cost"] > 0 for r in rows)
    assert RouterArtifact.load(tmp_path / "r").experts == ["demo-llama", "demo-falcon"]
