"""Bring your own data: `frugalserve calibrate --data FILE --config CONFIG` on a hand-made data set
(not the task suite's), every grader kind, per-expert labels, a scripted judge behind an
OpenAI-compatible endpoint (the stand-in for a hosted judge), and a resumed run."""

from __future__ import annotations

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from frugalserve.cascade.artifact import RouterArtifact
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.serve_app.routing.cli import calibrate_main
from frugalserve.serve_app.routing.collect import JUDGE_RUBRIC, DataError, load_items

QUESTION = re.compile(r"Question:\s*What is (\d+) \+ (\d+)\?\s*Answer:\s*(.*?)\s*Verdict", re.S)


class ScriptedJudge:
    """Says YES when the answer under review is the sum the question asks for."""

    def __init__(self):
        self.calls = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.calls += 1
                m = QUESTION.search(body["messages"][-1]["content"])
                verdict = "YES" if m and m.group(3).strip() == str(int(m[1]) + int(m[2])) else "NO"
                data = json.dumps({
                    "id": "chatcmpl-judge", "object": "chat.completion", "created": 0,
                    "model": body["model"], "choices": [{
                        "index": 0, "finish_reason": "stop", "logprobs": None,
                        "message": {"role": "assistant", "content": verdict}}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def _data() -> list[dict]:
    rng = random.Random(5)
    lines = []
    for _ in range(24):
        a, b = rng.randint(1, 60), rng.randint(1, 40)
        lines.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "grader": "exact",
                      "domain": "sums"})
    for _ in range(12):
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        lines.append({"prompt": f"What is {a} * {b}?", "answer": str(a * b), "grader": "numeric",
                      "tolerance": 0.5, "domain": "products"})
    for w in ("cat", "stone", "river", "planet", "lamp", "orbit"):
        lines.append({"prompt": f'Reverse the word "{w}".', "answer": f"^{w[::-1]}$",
                      "grader": "regex", "domain": "words"})
        lines.append({"prompt": f'How many letters are in "{w}"?', "answer": str(len(w)),
                      "grader": "contains", "domain": "words"})
    for q, a in (("Who wrote Hamlet?", "Shakespeare"), ("What is the capital of Japan?", "Tokyo"),
                 ("Which planet is known as the red planet?", "Mars")):
        lines.append({"prompt": q, "answer": a, "grader": "normalized", "domain": "open"})
        lines.append({"messages": [{"role": "system", "content": "Answer in JSON."},
                                   {"role": "user", "content": q}],
                      "answer": {"answer": a}, "grader": "json", "domain": "open"})
    for i in range(6):
        lines.append({"id": f"labelled-{i}", "prompt": f"What is {i} + {i}?",
                      "labels": {"tier-s": i % 2 == 0, "tier-m": 1.0}, "domain": "sums"})
    for _ in range(8):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append({"prompt": f"What is {a} + {b}?", "domain": "judged"})
    return lines


@pytest.fixture(scope="module")
def judge():
    j = ScriptedJudge()
    yield j
    j.server.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, judge):
    root = tmp_path_factory.mktemp("byod")
    data = root / "mine.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _data()))
    config = root / "app.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "mine", "route_prefix": "/", "import_path": "frugalserve.serve_app.app:build_app",
        "args": {"experts": [
            {"name": "tier-s", "engine": {"model": "builtin:tier-s"}},
            {"name": "tier-m", "engine": {"model": "builtin:tier-m"}},
            {"name": "grader", "remote": {"base_url": judge.url, "logprobs": False},
             "cost_per_1k_prompt": 0.0, "cost_per_1k_completion": 0.0}]}}]}))
    return root, data, config


def _calibrate(root, data, config) -> int:
    return calibrate_main(["--data", str(data), "--config", str(config), "--judge", "grader",
                           "--out", str(root / "router"), "--featurizer", "hashed-ngrams",
                           "--max-tokens", "16", "--concurrency", "2"])


def test_calibrate_from_own_data_end_to_end(setup, judge):
    root, data, config = setup
    assert _calibrate(root, data, config) == 0
    art = RouterArtifact.load(root / "router")
    assert art.experts == ["tier-s", "tier-m"]  # the judge is not routed to
    assert art.familiarity is not None and art.plan is not None
    report = root / "router" / "calibration-report"
    assert {"report.md", "report.json", "frontier.png", "pgr.png"} <= {p.name for p in report.iterdir()}
    rows = [json.loads(x) for x in (root / "router" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(_data())
    m = ResponseMatrix.load(root / "router" / "responses.jsonl")
    assert m.n == len(_data())
    summary = json.loads((report / "report.json").read_text())
    assert set(summary["mixes"]) >= {"all", "sums only", "words only", "judged only"}
    judged = {(r["prompt"], r["answer"]) for r in rows if r["domain"] == "judged"}
    assert judge.calls == len(judged)  # one verdict per distinct question and answer


def test_every_label_source_is_used(setup):
    root, data, config = setup
    from frugalserve.serve_app.config import app_config_from_file
    from frugalserve.serve_app.routing.collect import collect

    rows = collect(load_items(data), app_config_from_file(config), root / "router" / "responses.jsonl",
                   experts=["tier-s", "tier-m"], judge="grader", progress=False)
    sources = {r["label_source"] for r in rows}
    assert sources == {"exact", "numeric", "regex", "contains", "normalized", "json", "label", "judge"}
    labelled = {(r["id"], r["expert"]): r["correct"] for r in rows if r["label_source"] == "label"}
    assert labelled[("labelled-1", "tier-s")] is False and labelled[("labelled-1", "tier-m")] is True
    graded = [r["correct"] for r in rows if r["label_source"] not in ("label", "judge")]
    assert any(graded) and not all(graded)  # the zoo's tiers get sums right, not open questions


def test_an_interrupted_run_resumes_where_it_stopped(setup, judge):
    root, data, config = setup
    cache = root / "router" / "responses.jsonl"
    before = {(r["id"], r["expert"]): r["answer"] for r in map(json.loads, cache.read_text().splitlines())}
    kept = cache.read_text().splitlines()[:-30]
    cache.write_text("\n".join(kept) + '\n{"id": "torn", "exp')  # killed mid-write
    calls = judge.calls
    assert _calibrate(root, data, config) == 0
    rows = [json.loads(x) for x in cache.read_text().splitlines() if x.startswith('{"id": "') and x.endswith("}")]
    after = {(r["id"], r["expert"]): r["answer"] for r in rows}
    assert after == before  # the 30 missing answers were asked again, nothing else
    assert len(rows) == len(before)
    assert judge.calls == calls  # the judge's verdicts come from its cache


def test_bad_data_lines_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for text, match in (('{"answer": "1"}', "needs `prompt`"), ("not json", "not JSON"),
                        ('{"prompt": "x", "answer": "(", "grader": "regex"}', "does not compile"),
                        ('{"prompt": "x", "labels": {"a": 2}}', "labels")):
        bad.write_text('{"prompt": "fine"}\n' + text + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{match}"):
            load_items(bad)
    assert "{question}" in JUDGE_RUBRIC and "{answer}" in JUDGE_RUBRIC
