"""Prometheus metrics, through `ray.serve.metrics` so every replica process reports them.

Ray exports them on each node's metrics port with the prefix `ray_` (counters also get
`_total`), beside Serve's own `ray_serve_*` series; e.g. `ray_frugalserve_requests_total`.
Names follow vLLM's habits (`time_to_first_token_seconds`, `inter_token_latency_seconds`,
`e2e_request_latency_seconds`). Metrics are created lazily, once per process.
"""

from __future__ import annotations

import functools
import time

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def router_metrics():
    return {
        "requests": Counter("frugalserve_requests", "requests by model, policy and HTTP status",
                            tag_keys=("model", "policy", "status")),
        "prompt_tokens": Counter("frugalserve_prompt_tokens", "prompt tokens processed",
                                 tag_keys=("expert",)),
        "completion_tokens": Counter("frugalserve_completion_tokens", "tokens generated",
                                     tag_keys=("expert",)),
        "cost": Counter("frugalserve_cost_units", "cost units spent", tag_keys=("expert",)),
        "escalations": Counter("frugalserve_escalations", "cascade escalations to a next tier",
                               tag_keys=("policy",)),
        "gate_choice": Counter("frugalserve_gate_choice", "experts the MoE gate chose",
                               tag_keys=("expert",)),
        "ttft": Histogram("frugalserve_time_to_first_token_seconds",
                          "time from request to the first streamed token",
                          boundaries=LATENCY_BUCKETS, tag_keys=("model",)),
        "itl": Histogram("frugalserve_inter_token_latency_seconds",
                         "time between streamed chunks", boundaries=ITL_BUCKETS,
                         tag_keys=("model",)),
        "e2e": Histogram("frugalserve_e2e_request_latency_seconds",
                         "time from request to the last byte", boundaries=LATENCY_BUCKETS,
                         tag_keys=("model", "policy")),
    }


@functools.cache
def expert_metrics():
    return {
        "batch_size": Histogram("frugalserve_batch_size", "sequences per engine step "
                                "(continuous batching) or requests per engine call (static)",
                                boundaries=BATCH_BUCKETS, tag_keys=("expert",)),
        "queue_depth": Gauge("frugalserve_queue_depth",
                             "requests waiting for or running in the engine",
                             tag_keys=("expert",)),
        # the memory profile and the autoscaling signal (experts/memory.py names them)
        **{name: Gauge(name, help_, tag_keys=("expert",)) for name, help_ in (
            ("frugalserve_weight_bytes", "bytes the replica's weights take"),
            ("frugalserve_kv_bytes_per_token", "KV-cache bytes one token in flight takes"),
            ("frugalserve_usable_bytes", "bytes the replica may use for tokens"),
            ("frugalserve_tokens_in_flight", "prompt + generated tokens of requests in flight"),
            ("frugalserve_bytes_in_use", "bytes the tokens in flight take"),
            ("frugalserve_requests_in_flight", "requests the token ledger counts"),
        )},
    }


def record_outcome(record: dict) -> None:
    """Count tokens, cost, escalations and gate choices of one answered request."""
    m = router_metrics()
    for run in record.get("runs", []):
        tags = {"expert": run["expert"]}
        m["prompt_tokens"].inc(run["prompt_tokens"], tags)
        m["completion_tokens"].inc(run["completion_tokens"], tags)
        m["cost"].inc(run["cost"], tags)
    if record.get("escalations"):
        m["escalations"].inc(record["escalations"], {"policy": record.get("policy", "direct")})
    for expert in record.get("gate_choice", []):
        m["gate_choice"].inc(1, {"expert": expert})


class StreamTimer:
    """TTFT, inter-token latency and end-to-end latency of one streamed response (the middleware
    times the other responses)."""

    def __init__(self, started: float, model: str, policy: str):
        self.started, self.model, self.policy = started, model, policy
        self.last: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        m = router_metrics()
        if self.last is None:
            m["ttft"].observe(now - self.started, {"model": self.model})
        else:
            m["itl"].observe(now - self.last, {"model": self.model})
        self.last = now

    def done(self) -> None:
        router_metrics()["e2e"].observe(time.perf_counter() - self.started,
                                        {"model": self.model, "policy": self.policy})
