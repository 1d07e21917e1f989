"""Scrape the real Prometheus endpoint of the running application."""

from __future__ import annotations

import time

import httpx
import pytest
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


def wait_for(url, check):
    """The first scrape that passes `check` (the test's timeout bounds the wait)."""
    while not check(samples := scrape(url)):
        time.sleep(1.0)
    return samples


@pytest.mark.timeout(180)  # a series that never reaches the exporter would hang here
def test_requests_tokens_latency_and_batches_are_exported(app_url, metrics_url):
    before = scrape(metrics_url)
    n, tokens = 3, 0
    with httpx.Client(base_url=app_url, timeout=60) as c:
        for i in range(n):
            r = c.post("/v1/chat/completions", json={
                "model": "demo-falcon", "max_tokens": 4,
                "messages": [{"role": "user", "content": f"metrics {i}"}]})
            assert r.status_code == 200
            tokens += r.json()["usage"]["completion_tokens"]
        with c.stream("POST", "/v1/chat/completions", json={
            "model": "demo-falcon", "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "metrics stream"}]}) as s:
            for _ in s.iter_lines():
                pass
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]}).status_code == 404

    req, gen = "ray_frugalserve_requests_total", "ray_frugalserve_completion_tokens_total"

    def missing(s) -> list[str]:
        """What has not reached the exporter yet (each series gets there on its own schedule)."""
        grew = {
            "requests 200": total(s, req, model="demo-falcon", status="200")
            - total(before, req, model="demo-falcon", status="200") >= n + 1,
            "requests 404": total(s, req, status="404") > total(before, req, status="404"),
            "completion tokens": total(s, gen, expert="demo-falcon")
            - total(before, gen, expert="demo-falcon") >= tokens,
            "weight bytes": total(s, "ray_frugalserve_weight_bytes", expert="demo-falcon") > 0,
            **{name: total(s, name) > total(before, name) for name in (
                "ray_frugalserve_e2e_request_latency_seconds_count",
                "ray_frugalserve_time_to_first_token_seconds_count",
                "ray_frugalserve_batch_size_count")},
        }
        return [k for k, ok in grew.items() if not ok]

    after = wait_for(metrics_url, lambda s: not missing(s))
    assert any(n == "ray_frugalserve_queue_depth" for n, _ in after)
    # the memory profile and the autoscaling signal of each expert
    assert total(after, "ray_frugalserve_kv_bytes_per_token", expert="demo-falcon") > 0
    assert total(after, "ray_frugalserve_weight_bytes", expert="demo-falcon") > 100_000
    assert any(n == "ray_frugalserve_tokens_in_flight" for n, _ in after)
    assert any(n.startswith("ray_serve_") for n, _ in after)  # Serve's own series beside ours
