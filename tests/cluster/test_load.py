"""A short bounded locust run against the test application: no failures, a sane summary."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import REPO

MODELS = "moe,cascade,demo-llama,demo-falcon"  # not `dead` (a closed port) nor remote ones


def test_bounded_load_has_no_failures(app_url, tmp_path):
    out = tmp_path / "load"
    # locust patches the standard library with gevent: it runs in its own process
    proc = subprocess.run(
        [sys.executable, "-m", "frugalserve.cluster.load.run", "--host", app_url,
         "--users", "4", "--spawn-rate", "4", "--run-time", "6s", "--stop-timeout", "30",
         "--models", MODELS, "--max-tokens", "8", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    assert "req/s" in proc.stdout and "TTFT" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0, summary["errors"]
    assert summary["exceptions"] == 0
    assert summary["requests"] >= 4
    assert summary["requests_per_s"] > 0 and summary["tokens_per_s"] > 0
    assert 0 < summary["completion_tokens"] <= 8 * summary["requests"] * 4  # cascade may run 3 tiers
    for key in ("latency_ms", "ttft_ms"):
        d = summary[key]
        assert d["count"] > 0, key
        assert 0 < d["p50"] <= d["p95"] <= d["p99"], (key, d)  # bucketed: may pass `max`
    # TTFT is part of a streamed request's latency
    assert summary["ttft_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert set(summary["by_request"]) <= {f"chat {m} {k}" for m in MODELS.split(",")
                                         for k in ("stream", "json")}
    with open(out / "locust_stats.csv") as f:
        rows = list(csv.DictReader(f))
    types = {r["Type"] for r in rows}
    assert {"POST", "TTFT"} <= types, types
    assert sum(int(r["Request Count"]) for r in rows if r["Type"] == "POST") == summary["requests"]
    for name in ("locust_stats_history.csv", "locust_failures.csv", "locust_exceptions.csv"):
        assert (out / name).is_file(), name
