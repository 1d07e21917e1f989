"""Prometheus metrics, through `ray.serve.metrics` so every replica process reports them.

Ray exports them on each node's metrics port with the prefix `ray_` (counters also get
`_total`), beside Serve's own `ray_serve_*` series; e.g. `ray_frugalserve_requests_total`.
Beside ours, vLLM's series where the meaning is the same (`model_name` label = the expert that
ran): they export as `ray_vllm_*`, the names Ray Serve LLM gives vLLM's metrics, and the API
port's `/metrics` (`application_metrics`) shows them as vLLM's own server does (`vllm:*`), so
dashboards for either work. Metrics are created lazily, once per process.
"""

from __future__ import annotations

import asyncio
import functools
import time

import httpx
from ray.serve.metrics import Counter, Gauge, Histogram

# What the API port's /metrics shows: the application's series (ours, vLLM's, Serve's).
APPLICATION_PREFIXES = ("ray_frugalserve_", "ray_vllm_", "ray_serve_")
VLLM_EXPORTED, VLLM_NATIVE = "ray_vllm_", "vllm:"

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
        "retries": Counter("frugalserve_retries", "attempts retried after the expert failed "
                           "before sending anything, by that expert and the error's code",
                           tag_keys=("expert", "code")),
        "fallbacks": Counter("frugalserve_fallbacks", "requests answered by another expert "
                             "than the first candidate", tag_keys=("expert", "fallback")),
        "stream_errors": Counter("frugalserve_stream_errors", "streams ended by an in-band "
                                 "error after their first token", tag_keys=("expert", "code")),
        "circuit_state": Gauge("frugalserve_circuit_state", "a remote expert's circuit breaker: "
                               "0 closed, 1 half open, 2 open", tag_keys=("expert",)),
        "ttft": Histogram("frugalserve_time_to_first_token_seconds",
                          "time from request to the first streamed token",
                          boundaries=LATENCY_BUCKETS, tag_keys=("model",)),
        "itl": Histogram("frugalserve_inter_token_latency_seconds",
                         "time between streamed chunks", boundaries=ITL_BUCKETS,
                         tag_keys=("model",)),
        "e2e": Histogram("frugalserve_e2e_request_latency_seconds",
                         "time from request to the last byte", boundaries=LATENCY_BUCKETS,
                         tag_keys=("model", "policy")),
        **vllm_metrics(),
    }


def vllm_metrics():
    """vLLM's names (Ray forbids ':' in names: `vllm_X` exports as `ray_vllm_X`, vLLM's `vllm:X`)."""
    tags = ("model_name",)
    return {
        "vllm_ttft": Histogram("vllm_time_to_first_token_seconds", "Histogram of time to first "
                               "token in seconds.", boundaries=LATENCY_BUCKETS, tag_keys=tags),
        "vllm_itl": Histogram("vllm_inter_token_latency_seconds", "Histogram of inter-token "
                              "latency in seconds.", boundaries=ITL_BUCKETS, tag_keys=tags),
        "vllm_e2e": Histogram("vllm_e2e_request_latency_seconds", "Histogram of e2e request "
                              "latency in seconds.", boundaries=LATENCY_BUCKETS, tag_keys=tags),
        "vllm_prompt_tokens": Counter("vllm_prompt_tokens", "Number of prefill tokens processed.",
                                      tag_keys=tags),
        "vllm_generation_tokens": Counter("vllm_generation_tokens", "Number of generation tokens "
                                          "processed.", tag_keys=tags),
        "vllm_success": Counter("vllm_request_success", "Count of successfully processed "
                                "requests.", tag_keys=("model_name", "finished_reason")),
    }


def exported_names() -> dict[str, str]:
    """Every series name this module exports, as Prometheus reads it from Ray's metrics port,
    -> its kind (counter, gauge, histogram)."""
    out = {}
    for m in (*router_metrics().values(), *expert_metrics().values()):
        kind = type(m).__name__.lower()
        name = "ray_" + m._name + ("_total" if kind == "counter" else "")
        out[name] = kind
    return out


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


def _add(counter, value: float, tags: dict) -> None:
    """Ray's counters refuse increments of 0 (a free expert's cost, an empty completion)."""
    if value > 0:
        counter.inc(value, tags)


def record_outcome(record: dict, finish_reasons: tuple[str, ...] = ()) -> None:
    """Count tokens, cost, escalations and gate choices of one answered request."""
    m = router_metrics()
    for run in record.get("runs", []):
        tags = {"expert": run["expert"]}
        _add(m["prompt_tokens"], run["prompt_tokens"], tags)
        _add(m["completion_tokens"], run["completion_tokens"], tags)
        _add(m["cost"], run["cost"], tags)
        vtags = {"model_name": run["expert"]}
        _add(m["vllm_prompt_tokens"], run["prompt_tokens"], vtags)
        _add(m["vllm_generation_tokens"], run["completion_tokens"], vtags)
    answered = record.get("answered_by")
    for reason in finish_reasons if answered else ():
        m["vllm_success"].inc(1, {"model_name": answered, "finished_reason": reason})
    if record.get("escalations"):
        m["escalations"].inc(record["escalations"], {"policy": record.get("policy", "direct")})
    for expert in record.get("gate_choice", []):
        m["gate_choice"].inc(1, {"expert": expert})


class StreamTimer:
    """TTFT, inter-token latency and end-to-end latency of one streamed response (the middleware
    times the other responses): ours by the requested model, vLLM's by the expert streaming."""

    def __init__(self, started: float, model: str, policy: str):
        self.started, self.model, self.policy = started, model, policy
        self.last: float | None = None
        self.expert = model  # the expert that streams (set once known)

    def token(self) -> None:
        now = time.perf_counter()
        m, vtags = router_metrics(), {"model_name": self.expert}
        if self.last is None:
            m["ttft"].observe(now - self.started, {"model": self.model})
            m["vllm_ttft"].observe(now - self.started, vtags)
        else:
            m["itl"].observe(now - self.last, {"model": self.model})
            m["vllm_itl"].observe(now - self.last, vtags)
        self.last = now

    def done(self) -> None:
        elapsed = time.perf_counter() - self.started
        m = router_metrics()
        m["e2e"].observe(elapsed, {"model": self.model, "policy": self.policy})
        m["vllm_e2e"].observe(elapsed, {"model_name": self.expert})


# -- the API port's /metrics --------------------------------------------------------------------


async def application_metrics() -> str:
    """The application's series from every alive node's Ray metrics agent (the router's own node
    over loopback), one HELP/TYPE per family, vLLM's series under vLLM's own names."""
    import ray  # the router replica's Ray: node addresses and metrics ports

    here = ray.get_runtime_context().get_node_id()
    urls = [f"http://{'127.0.0.1' if n['NodeID'] == here else n['NodeManagerAddress']}:"
            f"{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n.get("Alive")]
    async with httpx.AsyncClient(timeout=5) as client:
        pages = await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True)
    texts = [p.text for p in pages if isinstance(p, httpx.Response) and p.status_code == 200]
    return filter_series(texts)


def filter_series(texts: list[str]) -> str:
    seen, out = set(), []
    for text in texts:
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) < 3 or not parts[2].startswith(APPLICATION_PREFIXES):
                    continue
                key = (parts[1], parts[2])
                if key in seen:
                    continue
                seen.add(key)
            elif not line.startswith(APPLICATION_PREFIXES):
                continue
            out.append(line.replace(VLLM_EXPORTED, VLLM_NATIVE, 1) if VLLM_EXPORTED in line else line)
    return "\n".join(out) + "\n"
