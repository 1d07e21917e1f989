"""Integration on CPU: an expert with a deliberately small memory budget scales from 1 to ≥ 2
replicas under a bounded burst of long requests and back to 1 after it, every request answered.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

APP, PREFIX, DEPLOYMENT = "autoscale", "/autoscale", "expert-demo-llama"
WEIGHTS = 361_760  # demo-llama's parameters + buffers, float32
USABLE = 150_000  # bytes for tokens: ~585 tokens at 256 B/token; at 50 % ~290 per replica
ARGS = {
    "gpus": "never",
    "default_model": "demo-llama",
    "router": {"num_replicas": 1, "num_cpus": 0.1},
    "experts": [{
        "name": "demo-llama",
        "engine": {"model": "builtin:demo-llama", "scheduler": {"max_batch_size": 8},
                   "kv_cache": {"memory_budget_bytes": WEIGHTS + USABLE, "memory_fraction": 1.0}},
        "deployment": {
            "resources": {"num_cpus": 0.25}, "batch_wait_timeout_s": 0.05,
            "autoscaling": {
                "min_replicas": 1, "max_replicas": 3, "target_utilisation": 0.5,
                "target_ongoing_requests": 1000,  # no request floor: memory alone decides
                "upscale_delay_s": 0, "downscale_delay_s": 4,
                "look_back_period_s": 1.0, "metrics_interval_s": 0.25,
            },
        },
    }],
}
REQUESTS_PER_WAVE, CONCURRENCY, MAX_WAVES = 16, 12, 25  # bounded: ≤ 400 requests, ~1-2 s a wave


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def test_scales_up_under_a_burst_and_down_after(serve_http):
    import httpx
    from frugalserve.serve_app.app import build_app
    from ray import serve

    serve.run(build_app(ARGS), name=APP, route_prefix=PREFIX)
    try:
        expert = serve.get_deployment_handle(DEPLOYMENT, APP)
        memory = expert.info.remote().result()["memory"]
        assert memory["kv_bytes_per_token"] == pytest.approx(256, rel=0.02)
        # the paged cache takes whole pages (16 tokens = 4 KiB here), one of them scratch
        assert USABLE - 2 * 4096 <= memory["usable_bytes"] <= USABLE
        assert memory["total_source"] == "budget" and memory["kv_measure_method"] == "paged-cache"

        seen: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append((time.monotonic(), running_replicas()))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def ask(i: int) -> httpx.Response:
            body = {"model": "demo-llama", "prompt": f"request {i}: tell a long story",
                    "max_tokens": 200, "temperature": 0}
            return httpx.post(f"{serve_http}{PREFIX}/v1/completions", json=body, timeout=120)

        answers = []
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            # A new replica takes seconds to load and profile its model on a busy 2-core machine:
            # keep the load on until a second one is RUNNING, then stop.
            for wave in range(MAX_WAVES):
                start = wave * REQUESTS_PER_WAVE
                answers += list(pool.map(ask, range(start, start + REQUESTS_PER_WAVE)))
                if max(n for _, n in seen) >= 2:
                    break
        peak = max(n for _, n in seen)
        assert peak >= 2, f"never scaled up: replicas seen {sorted({n for _, n in seen})}"
        bad = [(r.status_code, r.text[:200]) for r in answers if r.status_code != 200]
        assert not bad, bad
        assert all(r.json()["choices"][0]["text"] is not None for r in answers)

        deadline = time.monotonic() + 60
        while running_replicas() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        watcher.join()
        assert running_replicas() == 1, "did not scale back down to 1 after the burst"
        stats = expert.stats.remote().result()
        assert stats["tokens"]["tokens_in_flight"] == 0 and stats["tokens"]["peak_tokens"] > 0
    finally:
        serve.delete(APP)
