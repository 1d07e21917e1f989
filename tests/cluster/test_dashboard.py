"""The Grafana dashboard queries exactly the metrics the application exports, the right way."""

from __future__ import annotations

import json
import re

from tests.conftest import REPO

DASHBOARD = REPO / "cluster/dashboards/frugalserve-grafana.json"
COUNTERS = {"requests_total", "prompt_tokens_total", "completion_tokens_total",
            "escalations_total", "gate_choice_total", "cost_units_total", "retries_total",
            "fallbacks_total", "stream_errors_total"}
HISTOGRAMS = {"time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "batch_size"}
GAUGES = {"queue_depth", "bytes_in_use", "usable_bytes", "tokens_in_flight", "requests_in_flight",
          "weight_bytes", "kv_bytes_per_token",  # the memory-per-token autoscaler's signal
          "circuit_state"}
SERIES = re.compile(r"\bray_frugalserve_([a-z0-9_]+)")


def exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_every_metric_is_shown_and_nothing_else():
    used = set()
    for expr in exprs():
        for name in SERIES.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in COUNTERS | HISTOGRAMS | GAUGES, f"unknown series {name} in {expr}"
            if base in HISTOGRAMS:
                assert name != base, f"histogram {base} used without _bucket/_sum/_count: {expr}"
            if name in COUNTERS or name != base:  # counters and histogram parts: only as rates
                assert re.search(rf"rate\(ray_frugalserve_{name}\b", expr), expr
            used.add(base)
    assert used == COUNTERS | HISTOGRAMS | GAUGES


def test_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
