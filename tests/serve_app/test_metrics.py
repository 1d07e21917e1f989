"""Scrape the real Prometheus endpoints of the running application: Ray's metrics port, and the
API port's /metrics. The names come from the metrics module, so a series added there is checked
here too."""

from __future__ import annotations

import time

import httpx
import pytest
from frugalserve.serve_app.metrics import VLLM_EXPORTED, VLLM_NATIVE, exported_names
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def present(samples, name: str) -> bool:
    return any(n == name for n, _ in samples)


def wait_for(url, missing, bound_s: float = 120.0):
    """The first scrape where nothing is `missing`; past `bound_s` (a bound on the wait, not a
    claim about speed: series reach the exporter every second here), fail naming what is."""
    deadline = time.monotonic() + bound_s
    while gaps := missing(samples := scrape(url)):
        assert time.monotonic() < deadline, f"never exported: {gaps}"
        time.sleep(1.0)
    return samples


def sample_name(name: str, kind: str) -> str:
    return name + "_count" if kind == "histogram" else name


# counted only when something fails, or (the breaker's gauge) set on a remote expert's calls:
# tests/serve_app/test_failover.py checks them
FAILOVER = {"ray_frugalserve_retries_total", "ray_frugalserve_fallbacks_total",
            "ray_frugalserve_stream_errors_total", "ray_frugalserve_circuit_state"}


@pytest.mark.timeout(240)  # a series that never reaches the exporter would hang here
def test_every_series_carries_values_after_a_cascade_a_moe_and_a_stream(app_url, metrics_url):
    from tests.serve_app.test_routing import LIVE

    before = scrape(metrics_url)
    tokens = 0
    with httpx.Client(base_url=app_url, timeout=60) as c:
        escalated = 0
        for prompt in LIVE:  # some of them escalate (test_routing checks which)
            r = c.post("/v1/chat/completions", json={
                "model": "cascade", "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
            escalated += r.json()["frugalserve"]["escalations"]
            if escalated:
                break
        assert escalated
        assert c.post("/v1/chat/completions", json={
            "model": "moe", "max_tokens": 4, "messages": [{"role": "user", "content": "m"}],
        }).status_code == 200
        # demo-llama runs static batches: a delta per token, so the stream has gaps to time
        with c.stream("POST", "/v1/chat/completions", json={
            "model": "demo-llama", "max_tokens": 12, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "metrics stream"}]}) as s:
            for _ in s.iter_lines():
                pass
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]}).status_code == 404

    names = exported_names()
    assert "ray_vllm_time_to_first_token_seconds" in names and "ray_frugalserve_cost_units_total" in names

    def missing(s) -> list[str]:
        """What has not reached the exporter yet (each series gets there on its own schedule)."""
        gaps = []
        for name, kind in names.items():
            if name in FAILOVER:
                continue
            n = sample_name(name, kind)
            if kind == "gauge":
                if not present(s, n):
                    gaps.append(name)
            elif total(s, n) <= total(before, n):
                gaps.append(name)
        gen = "ray_frugalserve_completion_tokens_total"
        if total(s, gen) - total(before, gen) < tokens:
            gaps.append("completion tokens")
        if total(s, "ray_frugalserve_requests_total", status="404") <= total(
                before, "ray_frugalserve_requests_total", status="404"):
            gaps.append("requests 404")
        return gaps

    after = wait_for(metrics_url, missing)
    assert total(after, "ray_frugalserve_kv_bytes_per_token", expert="demo-falcon") > 0
    assert total(after, "ray_frugalserve_weight_bytes", expert="demo-falcon") > 100_000
    assert total(after, "ray_vllm_request_success_total", model_name="demo-llama",
                 finished_reason="length") > 0
    assert any(n.startswith("ray_serve_") for n, _ in after)  # Serve's own series beside ours

    # the API port: the same series, vLLM's under vLLM's own names
    api = scrape(f"{app_url}/metrics")
    vllm = [n for n in names if n.startswith(VLLM_EXPORTED)]
    for name in vllm:
        native = sample_name(name.replace(VLLM_EXPORTED, VLLM_NATIVE, 1), names[name])
        assert total(api, native) > 0, native
    assert total(api, "ray_frugalserve_requests_total") > 0
    assert not any(n.startswith(VLLM_EXPORTED) for n, _ in api)


def test_a_free_expert_or_an_empty_completion_is_counted_without_error(app_url):
    """Ray's counters refuse increments of 0: a run that cost nothing (an expert configured with
    cost 0, or an engine that reports no parameter count) must not fail the request."""
    from frugalserve.serve_app.metrics import record_outcome

    record_outcome({"runs": [{"expert": "free", "prompt_tokens": 3, "completion_tokens": 0,
                              "cost": 0.0}], "answered_by": "free"}, ("length",))
