"""The memory-per-token policy, called by hand with contexts built the way Serve builds them."""

from __future__ import annotations

import pytest
from frugalserve.cluster import autoscaling as pol
from frugalserve.cluster.autoscaling import STATE_KEY, MemoryPolicy, PolicyParams, decide

MiB = 1024**2
PARAMS = PolicyParams(target_utilisation=0.5, upscale_delay_s=0, downscale_delay_s=10)


def make_ctx(bytes_in_use, usable=100 * MiB, *, current=1, lo=1, hi=8, now=1000.0, state=None,
             requests=0.0, running=None, config=None):
    """An AutoscalingContext like Serve's controller builds it, with per-replica custom metrics."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="expert-demo", app_name="app")
    reps = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(bytes_in_use))]
    metrics = None
    if bytes_in_use:
        metrics = {
            pol.BYTES_IN_USE: dict(zip(reps, bytes_in_use)),
            pol.USABLE_BYTES: {r: float(usable) for r in reps},
            pol.TOKENS_IN_FLIGHT: {r: b / 256 for r, b in zip(reps, bytes_in_use)},
        }
    running_reps = reps if running is None else [
        ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(running)]
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name="app",
        current_num_replicas=len(running_reps), target_num_replicas=current,
        running_replicas=running_reps, total_num_requests=requests, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=config,
    )


def test_metric_names_match_the_replicas():
    from frugalserve.experts import memory

    for name in ("BYTES_IN_USE", "USABLE_BYTES", "TOKENS_IN_FLIGHT", "REQUESTS_IN_FLIGHT"):
        assert getattr(pol, name) == getattr(memory, name)


def test_scales_up_at_once_when_bytes_exceed_target():
    # 2 replicas at 60 MiB each of 100 MiB usable, target 50 %: 120 / 50 = 2.4 -> 3
    n, state = decide(make_ctx([60 * MiB, 60 * MiB], current=2), PARAMS)
    assert n == 3
    why = state[STATE_KEY]["last"]
    assert why["memory_replicas"] == 3 and why["reason"].startswith("scale up")
    assert why["bytes_in_use"] == 120 * MiB and why["capacity_bytes"] == 100 * MiB


def test_exactly_at_target_is_steady():
    n, state = decide(make_ctx([50 * MiB]), PARAMS)
    assert n == 1 and state[STATE_KEY]["last"]["reason"] == "steady"


def test_scales_down_only_after_the_delay_to_the_window_peak():
    state = {}
    ticks = [(0.0, 90 * MiB), (4.0, 40 * MiB), (9.0, 10 * MiB), (10.0, 10 * MiB)]
    decisions = []
    for t, used in ticks:
        ctx = make_ctx([used / 4] * 4, current=4, now=1000.0 + t, state=state)
        n, state = decide(ctx, PARAMS)
        decisions.append(n)
    # 90 MiB needs 2 replicas; held at 4 until 10 s after demand first fell, then down to the
    # highest demand seen in the window (2), not the last tick's (1).
    assert decisions == [4, 4, 4, 2]
    assert "scale down:" in state[STATE_KEY]["last"]["reason"]
    assert "down_since" not in state[STATE_KEY]


def test_a_rise_resets_the_downscale_window():
    state = {}
    for t, used, want in [(0, 10, 4), (8, 10, 4), (9, 400, 8), (12, 10, 8), (21, 10, 8), (22, 10, 1)]:
        ctx = make_ctx([used * MiB / 4] * 4, current=want if t < 9 else 8, now=1000.0 + t,
                       state=state)
        n, state = decide(ctx, PARAMS)
        assert n == want, (t, n, state[STATE_KEY]["last"])


def test_clamped_to_capacity_adjusted_bounds():
    n, state = decide(make_ctx([10_000 * MiB], hi=3), PARAMS)
    assert n == 3 and state[STATE_KEY]["last"]["memory_replicas"] == 200
    n, _ = decide(make_ctx([0.0, 0.0], current=2, lo=2, now=5000.0,
                           state={STATE_KEY: {"down_since": 0.0, "down_peak": 0}}), PARAMS)
    assert n == 2


def test_steady_without_metrics():
    for ctx in (make_ctx([], current=3, running=3), make_ctx([], current=2, running=0)):
        n, state = decide(ctx, PARAMS)
        assert n == ctx.target_num_replicas
        assert "no memory metrics" in state[STATE_KEY]["last"]["reason"]


def test_partial_metrics_scale_up_but_never_down():
    # 3 replicas running, only 1 reported (the others just started)
    n, _ = decide(make_ctx([90 * MiB], current=1, running=3), PARAMS)
    assert n == 2
    n, state = decide(make_ctx([1 * MiB], current=3, running=3, now=1e6,
                               state={STATE_KEY: {"down_since": 0.0, "down_peak": 1}}), PARAMS)
    assert n == 3 and "partial" in state[STATE_KEY]["last"]["reason"]


def test_request_floor():
    params = PolicyParams(target_utilisation=0.5, target_ongoing_requests=8)
    n, state = decide(make_ctx([1 * MiB], requests=30.0), params)
    assert n == 4 and state[STATE_KEY]["last"]["request_floor"] == 4


def test_upscale_delay():
    params = PolicyParams(upscale_delay_s=2.0)
    n, state = decide(make_ctx([300 * MiB], now=0.0), params)
    assert n == 1 and "pending" in state[STATE_KEY]["last"]["reason"]
    n, state = decide(make_ctx([300 * MiB], now=2.5, state=state), params)
    assert n == 5


def test_keeps_serves_own_state_keys():
    n, state = decide(make_ctx([1 * MiB], state={"__decision_counter": 3}), PARAMS)
    assert state["__decision_counter"] == 3


@pytest.mark.parametrize("bad", [{"target_utilisation": 0}, {"target_utilisation": 1.5},
                                 {"downscale_delay_s": -1}, {"target_ongoing_requests": 0}])
def test_bad_params_name_the_value(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        MemoryPolicy(**bad)


def autoscaling_config_dict(**policy_kwargs):
    return {
        "min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0, "downscale_delay_s": 0,
        "look_back_period_s": 2, "metrics_interval_s": 0.5, "policy": {
            "policy_function": "frugalserve.cluster.autoscaling:MemoryPolicy",
            "policy_kwargs": policy_kwargs,
        },
    }


def test_ray_accepts_the_config_and_wraps_the_policy():
    """What build_app passes: Ray 2.60 builds the class with policy_kwargs, cloudpickles the
    module by value, and its wrapper (factors, its own delays at 0) keeps our decision."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(**autoscaling_config_dict(
        target_utilisation=0.5, downscale_delay_s=10.0, target_ongoing_requests=64))
    policy = _resolve_policy_callable(config.policy)
    assert type(policy).__name__ == "MemoryPolicy" and policy.params.downscale_delay_s == 10.0
    wrapped = _apply_autoscaling_config(policy)
    n, state = wrapped(make_ctx([60 * MiB, 60 * MiB], current=2, config=config))
    assert n == 3 and state[STATE_KEY]["last"]["reason"].startswith("scale up")
    n, state = wrapped(make_ctx([1 * MiB] * 3, current=3, config=config, state=state))
    assert n == 3  # our downscale delay holds it, Serve's (0) does not add to it
    n, state = wrapped(make_ctx([1 * MiB] * 3, current=3, config=config, state=state, now=1011.0))
    assert n == 1


def test_plain_function_form_is_accepted_too():
    from ray.serve.config import AutoscalingConfig

    cfg = autoscaling_config_dict()
    cfg["policy"] = {"policy_function": "frugalserve.cluster.autoscaling:memory_policy"}
    policy = AutoscalingConfig(**cfg).policy.get_policy()
    n, _ = policy(make_ctx([90 * MiB]))
    assert n == 2  # defaults: target utilisation 0.7
