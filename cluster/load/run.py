"""A bounded headless load run: `python -m frugalserve.cluster.load.run --host URL`.

Runs the users of `locustfile.py` in-process (locust's library mode) for `--run-time`, then
writes locust's CSVs (`locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`,
`locust_exceptions.csv`) and `summary.json` under `--out`, and prints a short summary:
requests/s, completion tokens/s, p50/p95/p99 of request latency, TTFT and ITL, failures.
Exit status 1 when any request failed, 2 when the application cannot be reached. SIGTERM ends the
run early the same way (users finish their request, the files are written).

`--serve CONFIG` starts the application itself first (`frugalserve serve` on a free local port,
its log in `--out`/serve.log) and stops it afterwards: what `make load` does.

Locust patches the standard library with gevent when imported: run this as its own process,
never inside a Ray driver or a pytest process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import locust.stats
import requests
from frugalserve.cluster.load import locustfile
from locust.env import Environment
from locust.stats import StatsCSVFileWriter, StatsEntry
from locust.util.timespan import parse_timespan

PERCENTILES = (0.50, 0.95, 0.99)
STREAM_EVENTS = ("TTFT", "ITL")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m frugalserve.cluster.load.run",
                                description=__doc__.split("\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="the application's base URL")
    p.add_argument("--users", "-u", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--spawn-rate", "-r", type=float, default=8.0, help="users started per second")
    p.add_argument("--run-time", "-t", default="30s", help="how long to load, e.g. 20s, 5m")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds users get to finish their request at the end (default 30)")
    p.add_argument("--out", default="out/load", help="folder for the CSVs and summary.json")
    p.add_argument("--models", default="", help="comma-separated models to mix "
                   "(default: every id /v1/models lists)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    p.add_argument("--budget", type=float, default=None, help="frugalserve.budget for policies")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and choices")
    p.add_argument("--request-log", default="", help="one JSON line per request to this file "
                   "(locustfile.py says what is in it)")
    p.add_argument("--timeout", type=float, default=None,
                   help="client timeout per request in seconds (default: none)")
    p.add_argument("--serve", metavar="CONFIG", help="start the application from this config "
                   "on a free port (instead of --host) and stop it afterwards")
    p.add_argument("--serve-num-cpus", type=int, default=max(8, os.cpu_count() or 1),
                   help="logical CPUs for the --serve application's Ray (default: at least 8, "
                   "so that every replica of configs/local.yaml fits on a 2-core machine)")
    p.add_argument("--serve-timeout", type=float, default=300.0,
                   help="seconds the --serve application may take to become ready")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(config: str, out: Path, timeout_s: float, num_cpus: int) -> Iterator[str]:
    """`frugalserve serve --config CONFIG` in its own process; yields its URL once /healthz
    answers, stops it (SIGTERM: Serve and Ray shut down cleanly) when the block ends."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "frugalserve.cli", "serve", "--config", config,
         "--host", "127.0.0.1", "--port", str(port), "--num-cpus", str(num_cpus)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the application exited ({proc.returncode}); see {log.name}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the application was not ready in {timeout_s:g} s; "
                                   f"see {log.name}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def merged(entries: list[StatsEntry], stats, name: str) -> StatsEntry:
    out = StatsEntry(stats, name, "")
    for entry in entries:
        out.extend(entry)
    return out


def _latency(entry: StatsEntry) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{round(p * 100)}": entry.get_response_time_percentile(p) if entry.num_requests
           else None for p in PERCENTILES}
    out["mean"] = round(entry.avg_response_time, 2) if entry.num_requests else None
    out["max"] = round(entry.max_response_time, 2) if entry.num_requests else None
    out["count"] = entry.num_requests
    return out


def summarize(env: Environment, duration_s: float, args: argparse.Namespace) -> dict:
    """The run in one dict; rates are over the run's wall time, the final drain included."""
    stats = env.stats
    by_kind: dict[str, list[StatsEntry]] = {"request": [], "TTFT": [], "ITL": []}
    for entry in stats.entries.values():
        by_kind[entry.method if entry.method in STREAM_EVENTS else "request"].append(entry)
    requests = merged(by_kind["request"], stats, "requests")
    tokens = requests.total_content_length  # the locustfile reports completion tokens here
    return {
        "host": args.host,
        "users": args.users,
        "run_time_s": parse_timespan(args.run_time),
        "duration_s": round(duration_s, 3),
        "requests": requests.num_requests,
        "failures": requests.num_failures,
        "failure_ratio": round(requests.fail_ratio, 4),
        "requests_per_s": round(requests.num_requests / duration_s, 3) if duration_s else 0.0,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / duration_s, 3) if duration_s else 0.0,
        "latency_ms": _latency(requests),
        "ttft_ms": _latency(merged(by_kind["TTFT"], stats, "TTFT")),
        "itl_ms": _latency(merged(by_kind["ITL"], stats, "ITL")),
        "by_request": {e.name: {"requests": e.num_requests, "failures": e.num_failures,
                                "p50_ms": e.get_response_time_percentile(0.5),
                                "p95_ms": e.get_response_time_percentile(0.95)}
                       for e in sorted(by_kind["request"], key=lambda e: e.name)},
        "errors": [{"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
                   for e in stats.errors.values()],
        "exceptions": len(env.runner.exceptions) if env.runner else 0,
    }


def format_summary(s: dict) -> str:
    def row(label: str, d: dict) -> str:
        if not d["count"]:
            return f"  {label:<8} (none)"
        return (f"  {label:<8} p50 {d['p50']:>6} ms  p95 {d['p95']:>6} ms  p99 {d['p99']:>6} ms"
                f"  (n={d['count']})")

    return "\n".join([
        f"load against {s['host']}: {s['users']} users for {s['duration_s']:.1f} s",
        f"  requests {s['requests']}  failures {s['failures']}  "
        f"{s['requests_per_s']:.2f} req/s  {s['tokens_per_s']:.1f} completion tokens/s",
        row("latency", s["latency_ms"]),
        row("TTFT", s["ttft_ms"]),
        row("ITL", s["itl_ms"]),
        *[f"  error: {e['name']}: {e['error']} (x{e['occurrences']})" for e in s["errors"]],
    ])


def run(args: argparse.Namespace) -> dict:
    options = argparse.Namespace(fs_models=args.models, fs_stream_share=args.stream_share,
                                 fs_max_tokens=args.max_tokens, fs_budget=args.budget,
                                 fs_seed=args.seed, fs_request_log=args.request_log,
                                 fs_timeout=args.timeout)
    env = Environment(user_classes=[locustfile.ChatUser], host=args.host,
                      events=locust.events, stop_timeout=args.stop_timeout,
                      parsed_options=options)
    runner = env.create_local_runner()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = StatsCSVFileWriter(env, locust.stats.PERCENTILES_TO_REPORT, str(out / "locust"))
    writer_greenlet = gevent.spawn(writer.stats_writer)
    started = time.monotonic()
    runner.start(args.users, spawn_rate=args.spawn_rate)
    gevent.spawn_later(parse_timespan(args.run_time), runner.quit)
    gevent.signal_handler(signal.SIGTERM, runner.quit)  # stop early: users finish their request
    runner.greenlet.join()
    duration = time.monotonic() - started
    gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)  # one more write with final stats
    writer_greenlet.kill()
    writer.close_files()
    summary = summarize(env, duration, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.users < 1 or parse_timespan(args.run_time) < 1:
        print("load: --users and --run-time must be at least 1", file=sys.stderr)
        return 2
    if not args.serve:
        return load(args)
    try:
        with serving(args.serve, Path(args.out), args.serve_timeout,
                     args.serve_num_cpus) as url:
            args.host = url
            return load(args)
    except RuntimeError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2


def load(args: argparse.Namespace) -> int:
    try:
        models = locustfile.list_models(args.host, timeout=10)
    except Exception as exc:  # noqa: BLE001 - report and stop before any load
        print(f"load: cannot list models at {args.host}/v1/models: {exc}", file=sys.stderr)
        return 2
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(models) - {"default"})
    if unknown:
        print(f"load: --models {unknown} not served; available: {models}", file=sys.stderr)
        return 2
    summary = run(args)
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json and locust_*.csv")
    return 1 if summary["failures"] or summary["requests"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
