"""A bounded chaos run on loopback: steady load while replicas die and a remote expert misbehaves.

Used by `benchmarks/chaos.py` (`make chaos`, full size) and `tests/serve_app/test_failover.py`
(small size). The caller deploys the application; this module

- serves a stand-in for a hosted provider (`FlakyProvider`) that answers chat completions (JSON or
  SSE) and, when told, fails: a 500, a 429 with `Retry-After`, a hang (a timeout for the caller),
  or a reset connection (RST);
- runs the locust users of `locustfile.py` in their own process (locust patches the standard
  library with gevent) with a per-request log;
- every `kill_every_s`, once the expert has both its replicas running, kills one of them with
  `ray.kill` and notes when Serve has replaced it (the fault window);
- reads the log: requests sent, succeeded, failed by kind, retried; latency p50 / p99 of the
  requests in steady state (before the first kill) and of those that overlap a fault window;
  streams that failed after their first token; requests that ran past their deadline; and checks
  that the service answers normally after the last fault.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

FAULTS = ("500", "timeout", "reset")
ANSWER = "a flaky but correct answer"


class FlakyProvider:
    """An OpenAI-compatible chat endpoint on loopback. `mode`: "ok", one of "500", "429",
    "timeout", "reset" (every call fails that way), "stall" (a stream stops after its first
    word; a plain call hangs), or "random" (a share `fault_rate` of calls fail, cycling through
    `FAULTS`)."""

    def __init__(self, mode: str = "ok", fault_rate: float = 0.3, hang_s: float = 30.0,
                 seed: int = 0):
        self.mode, self.fault_rate, self.hang_s = mode, fault_rate, hang_s
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.kinds = itertools.cycle(FAULTS)
        self.calls: dict[str, int] = {}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = provider._next()
                if kind == "500":
                    return self._json(500, {"error": {"message": "internal error", "type":
                                                      "server_error", "param": None, "code": None}})
                if kind == "429":
                    return self._json(429, {"error": {"message": "rate limited", "type":
                                                      "requests", "param": None, "code": None}},
                                      {"Retry-After": "3"})
                if kind == "stall" and body.get("stream"):
                    return self._stream(body, stall=True)
                if kind in ("timeout", "stall"):
                    time.sleep(provider.hang_s)
                    self.close_connection = True
                    return None
                if kind == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return None
                return self._stream(body) if body.get("stream") else self._answer(body)

            def _answer(self, body):
                self._json(200, {
                    "id": "chatcmpl-flaky", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": ANSWER}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

            def _stream(self, body, stall: bool = False):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                head = {"id": "chatcmpl-flaky", "object": "chat.completion.chunk", "created": 0,
                        "model": body["model"]}
                for word in ANSWER.split():
                    self._event({**head, "choices": [{"index": 0, "delta": {"content": word + " "},
                                                      "finish_reason": None}]})
                    if stall:
                        time.sleep(provider.hang_s)
                        self.close_connection = True
                        return
                self._event({**head, "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": "stop"}]})
                self._event({**head, "choices": [], "usage": {
                    "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _event(self, data):
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _next(self) -> str:
        with self.lock:
            if self.mode == "random":
                kind = next(self.kinds) if self.rng.random() < self.fault_rate else "ok"
            else:
                kind = self.mode
            self.calls[kind] = self.calls.get(kind, 0) + 1
            return kind

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- replicas ------------------------------------------------------------------------------------


def replica_names(app: str, deployment: str) -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    states: dict = dict(status.deployments[deployment].replica_states)
    return int(states.get("RUNNING", 0))


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_replaced(app: str, deployment: str, killed: str, replicas: int,
                  timeout_s: float = 120.0) -> float:
    """Block until `replicas` replicas run again, none of them `killed`; the time it happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = replica_names(app, deployment)
        if killed not in names and len(names) >= replicas and running_replicas(
                app, deployment) >= replicas:
            return time.time()
        time.sleep(0.2)
    raise TimeoutError(f"{deployment} of {app} did not get back to {replicas} replicas in "
                       f"{timeout_s:g} s")


# -- the run -------------------------------------------------------------------------------------


@dataclass
class ChaosPlan:
    app: str  # the Serve application
    deployment: str  # the expert deployment whose replicas are killed (it has `replicas`)
    models: str  # comma-separated models the load mixes
    replicas: int = 2
    users: int = 6
    steady_s: float = 8.0  # load before the first kill
    kills: int = 5
    kill_every_s: float = 4.0  # at least this long between kills (and both replicas running)
    after_s: float = 5.0  # load after the last replacement
    deadline_s: float = 10.0  # the application's router.request_timeout_s
    max_tokens: int = 16
    stream_share: float = 0.5
    seed: int = 0


@dataclass
class Faults:
    kills: list[float] = field(default_factory=list)  # wall-clock times
    replaced: list[float] = field(default_factory=list)


def run_chaos(url: str, plan: ChaosPlan, out: Path, log=print) -> dict:
    """Load `url` while killing replicas per `plan`; the report (also written to out/chaos.json)."""
    out.mkdir(parents=True, exist_ok=True)
    requests_log = out / "requests.jsonl"
    requests_log.unlink(missing_ok=True)
    load_s = 3600  # ended by this run once the faults are over
    cmd = [sys.executable, "-m", "frugalserve.cluster.load.run", "--host", url,
           "--users", str(plan.users), "--spawn-rate", str(plan.users),
           "--run-time", f"{int(load_s)}s", "--models", plan.models,
           "--max-tokens", str(plan.max_tokens), "--stream-share", str(plan.stream_share),
           "--seed", str(plan.seed), "--request-log", str(requests_log),
           "--timeout", str(plan.deadline_s + 15), "--stop-timeout", str(plan.deadline_s + 20),
           "--out", str(out / "load")]
    with open(out / "load.log", "w") as load_log:
        proc = subprocess.Popen(cmd, stdout=load_log, stderr=subprocess.STDOUT)
        try:
            started = time.time()
            faults = _inject(plan, started, log)
            time.sleep(plan.after_s)
        finally:
            proc.terminate()  # the load stops: users finish their request, stats are written
            try:
                proc.wait(timeout=plan.deadline_s + 40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    records = [json.loads(line) for line in requests_log.read_text().splitlines() if line]
    report = analyse(records, faults, started, plan)
    report["after_check"] = after_check(url, plan)
    report["load_exit"] = proc.returncode
    (out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _inject(plan: ChaosPlan, started: float, log) -> Faults:
    faults = Faults()
    rng = random.Random(plan.seed)
    time.sleep(plan.steady_s)
    for i in range(plan.kills):
        while (running_replicas(plan.app, plan.deployment) < plan.replicas
               or len(replica_names(plan.app, plan.deployment)) < plan.replicas):
            time.sleep(0.2)
        victim = rng.choice(sorted(replica_names(plan.app, plan.deployment)))
        kill_replica(victim)
        faults.kills.append(time.time())
        faults.replaced.append(wait_replaced(plan.app, plan.deployment, victim, plan.replicas))
        log(f"kill {i + 1}/{plan.kills} at {faults.kills[-1] - started:6.1f} s: "
            f"{victim.rsplit('#', 1)[-1]}, replaced after "
            f"{faults.replaced[-1] - faults.kills[-1]:.1f} s")
        wait = plan.kill_every_s - (time.time() - faults.kills[-1])
        if wait > 0 and i < plan.kills - 1:
            time.sleep(wait)
    return faults


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))] * 1000, 1)


def analyse(records: list[dict], faults: Faults, started: float, plan: ChaosPlan) -> dict:
    windows = list(zip(faults.kills, faults.replaced))
    first_kill = faults.kills[0] if faults.kills else float("inf")
    last_replaced = faults.replaced[-1] if faults.replaced else started

    def overlaps(r: dict) -> bool:
        return any(r["t0"] <= b and r["t1"] >= a for a, b in windows)

    steady = [r for r in records if r["t1"] < first_kill]
    during = [r for r in records if overlaps(r)]
    after = [r for r in records if r["t0"] > last_replaced]
    failed = [r for r in records if not r["ok"]]
    kinds: dict[str, int] = {}
    for r in failed:
        key = f"{'stream' if r['stream'] else 'json'} {r['error']}"
        kinds[key] = kinds.get(key, 0) + 1
    ok_latency = {name: [r["t1"] - r["t0"] for r in rs if r["ok"]]
                  for name, rs in (("steady", steady), ("during_faults", during))}
    p99_steady = _pct(ok_latency["steady"], 0.99)
    p99_during = _pct(ok_latency["during_faults"], 0.99)
    return {
        "plan": plan.__dict__,
        "kills": len(faults.kills),
        "replacement_s": [round(b - a, 2) for a, b in windows],
        "sent": len(records),
        "succeeded": sum(r["ok"] for r in records),
        "failed": len(failed),
        "failed_by_kind": dict(sorted(kinds.items())),
        "failed_json": sum(1 for r in failed if not r["stream"]),
        "failed_streams": sum(1 for r in failed if r["stream"]),
        "failed_streams_after_tokens": sum(1 for r in failed if r["stream"] and r["tokens"] > 0),
        "retried": sum(1 for r in records if r["retries"]),
        "retries_by_cause": _count(x for r in records for x in r.get("retried", [])),
        "answered_by": _count(r["answered_by"] for r in records if r["ok"]),
        "hung": sum(1 for r in records if r["t1"] - r["t0"] > plan.deadline_s + 2),
        "latency_ms": {
            name: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "n": len(v)}
            for name, v in ok_latency.items()},
        "p99_ratio": round(p99_during / p99_steady, 2) if p99_steady and p99_during else None,
        "latency_ms_by_model": {
            model: {name: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "n": len(v)}
                    for name, v in (("steady", [r["t1"] - r["t0"] for r in steady if r["ok"]
                                                 and r["model"] == model]),
                                    ("during_faults", [r["t1"] - r["t0"] for r in during
                                                       if r["ok"] and r["model"] == model]))}
            for model in plan.models.split(",")},
        "after_last_fault": {"sent": len(after), "failed": sum(1 for r in after if not r["ok"])},
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return dict(sorted(out.items()))


def after_check(url: str, plan: ChaosPlan) -> dict:
    """Once the faults are over: each model answers a plain request and a stream normally."""
    results = {}
    with httpx.Client(base_url=url, timeout=plan.deadline_s + 5) as c:
        for model in plan.models.split(","):
            body = {"model": model, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "after the faults"}]}
            r = c.post("/v1/chat/completions", json=body)
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                lines = [line for line in s.iter_lines() if line.startswith("data:")]
            results[model] = {"json": r.status_code, "stream": s.status_code,
                              "stream_done": bool(lines) and lines[-1] == "data: [DONE]",
                              "stream_error": any('"error"' in line for line in lines)}
    return results


def targets(report: dict) -> dict[str, bool]:
    """The issue's targets, each met or not."""
    ratio = report["p99_ratio"]
    return {
        "at least 5 kills": report["kills"] >= 5,
        "0 failed non-streaming requests": report["failed_json"] == 0,
        "failed streams <= streams that had sent tokens":
            report["failed_streams"] <= report["failed_streams_after_tokens"],
        "p99 during faults <= 3x steady": ratio is not None and ratio <= 3,
        "0 hung past the deadline": report["hung"] == 0,
        "answers normally after the last fault": all(
            v["json"] == 200 and v["stream"] == 200 and v["stream_done"] and not v["stream_error"]
            for v in report["after_check"].values()),
    }


def format_report(report: dict) -> str:
    lat = report["latency_ms"]
    lines = [
        f"chaos: {report['kills']} replica kills (replaced after "
        f"{', '.join(f'{s:.1f}' for s in report['replacement_s'])} s)",
        f"  requests sent {report['sent']}  succeeded {report['succeeded']}  failed "
        f"{report['failed']} (json {report['failed_json']}, streams {report['failed_streams']}, "
        f"of which after tokens {report['failed_streams_after_tokens']})  retried "
        f"{report['retried']}  hung {report['hung']}",
        *[f"  failed: {k} x{v}" for k, v in report["failed_by_kind"].items()],
        f"  failed attempts retried, by expert and code: {report['retries_by_cause']}",
        f"  latency steady         p50 {lat['steady']['p50']} ms  p99 {lat['steady']['p99']} ms"
        f"  (n={lat['steady']['n']})",
        f"  latency during faults  p50 {lat['during_faults']['p50']} ms  p99 "
        f"{lat['during_faults']['p99']} ms  (n={lat['during_faults']['n']})  p99 ratio "
        f"{report['p99_ratio']}",
        *[f"    {m:<12} steady p50 {v['steady']['p50']} / p99 {v['steady']['p99']} ms, during "
          f"faults p50 {v['during_faults']['p50']} / p99 {v['during_faults']['p99']} ms"
          for m, v in report["latency_ms_by_model"].items()],
        f"  after the last fault: {report['after_last_fault']['sent']} requests, "
        f"{report['after_last_fault']['failed']} failed; check {report['after_check']}",
    ]
    for name, met in targets(report).items():
        lines.append(f"  target {name}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)
