"""Memory-per-token autoscaling: a pure function of Serve's `AutoscalingContext`.

Each expert replica reports, through `record_autoscaling_stats`, the bytes its tokens in flight
take (prompt + generated so far, running and queued, × measured KV bytes per token) and the bytes
it may use (`experts/memory.py`). Then

    desired = ceil(Σ bytes in use / (usable bytes per replica × target utilisation))

raised to a request floor ceil(ongoing requests / target_ongoing_requests), with hysteresis
(up at once, down only after `downscale_delay_s` of lower demand, to the highest demand seen in
that window), clamped to [min, max], and steady while metrics are missing. The reasoning of every
decision is returned in the policy state under `frugalserve`.

Serve loads the policy by import path (`autoscaling_config.policy.policy_function`) and
cloudpickles this module by value into its controller, so it imports only the standard library.
Ray 2.60 wraps custom policies in `_apply_autoscaling_config` (scaling factors, its own
up/down delays, bounds): give Serve `upscale_delay_s: 0, downscale_delay_s: 0` and the delays to
this policy (`policy_kwargs`), or they would add up.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

# Metric names the expert replicas report (mirrors frugalserve.experts.memory; a test checks).
BYTES_IN_USE = "frugalserve_bytes_in_use"
USABLE_BYTES = "frugalserve_usable_bytes"
TOKENS_IN_FLIGHT = "frugalserve_tokens_in_flight"
REQUESTS_IN_FLIGHT = "frugalserve_requests_in_flight"

STATE_KEY = "frugalserve"  # our part of the policy state; Serve keeps its own keys beside it


@dataclass(frozen=True)
class PolicyParams:
    """Knobs of the policy (the `policy_kwargs` of the autoscaling config)."""

    target_utilisation: float = 0.7  # fraction of usable bytes a replica should run at
    upscale_delay_s: float = 0.0  # demand above the current count this long before adding
    downscale_delay_s: float = 60.0  # demand below the current count this long before removing
    target_ongoing_requests: float | None = None  # request floor; None: the config's own value

    def __post_init__(self):
        if not 0 < self.target_utilisation <= 1:
            raise ValueError(f"target_utilisation must be in (0, 1], got {self.target_utilisation}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError(
                f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass(frozen=True)
class Demand:
    """What the replicas reported, summed over the deployment."""

    bytes_in_use: float
    tokens_in_flight: float
    capacity_bytes: float  # usable bytes of one replica (the smallest reported)
    reporting: int  # running replicas that reported
    running: int  # running replicas


def read_demand(ctx) -> Demand | None:
    """Sum the replicas' reports; None when no running replica has reported both figures."""
    metrics = ctx.aggregated_metrics or {}
    in_use = _finite(metrics.get(BYTES_IN_USE))
    usable = {r: v for r, v in _finite(metrics.get(USABLE_BYTES)).items() if v > 0}
    replicas = [r for r in in_use if r in usable]
    if not replicas:
        return None
    tokens = _finite(metrics.get(TOKENS_IN_FLIGHT))
    running = len(ctx.running_replicas) if ctx.running_replicas is not None else len(replicas)
    return Demand(
        bytes_in_use=sum(in_use[r] for r in replicas),
        tokens_in_flight=sum(tokens.get(r, 0.0) for r in replicas),
        capacity_bytes=min(usable[r] for r in replicas),
        reporting=len(replicas),
        running=max(running, len(replicas)),
    )


def _finite(per_replica) -> dict:
    if not per_replica:
        return {}
    return {r: float(v) for r, v in per_replica.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def _request_floor(ctx, params: PolicyParams) -> tuple[int, float]:
    target = params.target_ongoing_requests
    if target is None and ctx.config is not None:
        target = getattr(ctx.config, "target_ongoing_requests", None)
    requests = ctx.total_num_requests or 0.0
    if not target or not math.isfinite(requests):
        return 0, requests
    return math.ceil(requests / target), requests


def decide(ctx, params: PolicyParams = PolicyParams()) -> tuple[int, dict[str, Any]]:
    """One autoscaling tick: (replicas, policy state). Pure apart from reading `ctx`."""
    now = ctx.current_time if ctx.current_time is not None else time.time()
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas
    prev = dict((ctx.policy_state or {}).get(STATE_KEY) or {})
    why: dict[str, Any] = {"time": now, "current": current, "min": lo, "max": hi}

    demand = read_demand(ctx)
    if demand is None:
        why.update(decision=_clamp(current, lo, hi), reason="no memory metrics reported: hold")
        return _out(ctx, why["decision"], {}, why)

    per_replica = demand.capacity_bytes * params.target_utilisation
    memory_replicas = math.ceil(demand.bytes_in_use / per_replica - 1e-9)
    floor, requests = _request_floor(ctx, params)
    desired = _clamp(max(memory_replicas, floor), lo, hi)
    why.update(
        bytes_in_use=demand.bytes_in_use, tokens_in_flight=demand.tokens_in_flight,
        capacity_bytes=demand.capacity_bytes, target_utilisation=params.target_utilisation,
        utilisation=demand.bytes_in_use / (demand.capacity_bytes * max(demand.running, 1)),
        memory_replicas=memory_replicas, ongoing_requests=requests, request_floor=floor,
        desired=desired, reporting=demand.reporting, running=demand.running,
    )

    track: dict[str, Any] = {}
    if desired > current:
        since = prev.get("up_since", now)
        if now - since >= params.upscale_delay_s:
            decision, reason = desired, "scale up: demand above the current replicas"
        else:
            decision, reason = current, f"scale up pending ({now - since:.1f}s of {params.upscale_delay_s}s)"
            track = {"up_since": since}
    elif desired < current and demand.reporting < demand.running:
        decision, reason = current, "partial metrics: never scale down on them"
    elif desired < current:
        since = prev.get("down_since", now)
        peak = max(prev.get("down_peak", desired), desired)
        if now - since >= params.downscale_delay_s:
            decision, reason = peak, f"scale down: demand stayed below for {now - since:.1f}s"
        else:
            decision = current
            reason = f"scale down pending ({now - since:.1f}s of {params.downscale_delay_s}s)"
            track = {"down_since": since, "down_peak": peak}
    else:
        decision, reason = current, "steady"
    why.update(decision=_clamp(decision, lo, hi), reason=reason)
    return _out(ctx, why["decision"], track, why)


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(n)))


def _out(ctx, decision: int, track: dict, why: dict) -> tuple[int, dict[str, Any]]:
    state = {k: v for k, v in (ctx.policy_state or {}).items() if k != STATE_KEY}
    state[STATE_KEY] = {**track, "last": why}
    return decision, state


class MemoryPolicy:
    """The policy as Serve instantiates it: `policy_function` names this class and Serve calls
    `MemoryPolicy(**policy_kwargs)` once, then the instance on every tick."""

    def __init__(self, **kwargs: Any):
        self.params = PolicyParams(**kwargs)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        return decide(ctx, self.params)

    def __repr__(self) -> str:
        return f"MemoryPolicy({asdict(self.params)})"


def memory_policy(ctx) -> tuple[int, dict[str, Any]]:
    """The policy with default parameters, for `policy_function` without kwargs."""
    return decide(ctx)
