"""The application builder that `serve run` imports: `frugalserve.serve_app.app:build_app`.

One deployment per expert, named after it, plus the router ingress holding their handles.
"""

from __future__ import annotations

import logging
from typing import Any

from frugalserve.serve_app.config import AppConfig, parse_app_config
from frugalserve.serve_app.expert import ExpertServer
from frugalserve.serve_app.router import Router
from ray import serve
from ray.serve import Application

logger = logging.getLogger("ray.serve")


def _cluster_has_gpus() -> bool:
    import ray

    try:
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - no cluster view: assume a CPU machine
        return False


MEMORY_POLICY = "frugalserve.cluster.autoscaling:MemoryPolicy"  # a string: no import of cluster


def autoscaling_config(spec) -> dict[str, Any]:
    """Serve's autoscaling_config for an expert: our memory-per-token policy with its knobs in
    policy_kwargs. Serve's own delays are 0: Ray 2.60 wraps custom policies with its delay logic,
    and the policy keeps its own hysteresis (delays would otherwise add up)."""
    a = spec.autoscaling
    floor = a.target_ongoing_requests or 2.0 * spec.batching.max_batch_size
    config = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": a.look_back_period_s,
        "metrics_interval_s": a.metrics_interval_s,
        "policy": {
            "policy_function": MEMORY_POLICY,
            "policy_kwargs": {
                "target_utilisation": a.target_utilisation,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
                "target_ongoing_requests": floor,
            },
        },
    }
    if a.initial_replicas is not None:
        config["initial_replicas"] = a.initial_replicas
    return config


def expert_deployment_options(spec, use_gpus: bool) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus}
    if use_gpus and spec.resources.num_gpus > 0:
        actor["num_gpus"] = spec.resources.num_gpus
    if spec.resources.memory_bytes:
        actor["memory"] = spec.resources.memory_bytes
    options = {
        "name": f"expert-{spec.name}" if not spec.name.startswith("expert-") else spec.name,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": actor,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }
    if spec.engine == "vllm":  # vLLM takes whole GPUs, one per tensor-parallel rank
        from frugalserve.experts.vllm_engine import deployment_resources

        res = deployment_resources(spec)
        actor.update(res.pop("ray_actor_options"))
        options.update(res)
    if spec.autoscaling.enabled:
        options["autoscaling_config"] = autoscaling_config(spec)
    else:
        options["num_replicas"] = spec.num_replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    config: AppConfig = parse_app_config(dict(args or {}))
    use_gpus = config.gpus == "always" or (config.gpus == "auto" and _cluster_has_gpus())
    handles = {}
    for spec in config.experts:
        if spec.kind != "local":
            continue  # remote experts are called by the router, no deployment
        options = expert_deployment_options(spec, use_gpus)
        deployment = serve.deployment(ExpertServer).options(**options)
        handles[spec.name] = deployment.bind(spec.model_dump(mode="json"))
        logger.info("expert %s: %s", spec.name, options["ray_actor_options"])
    router = serve.deployment(Router).options(
        name="router",
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        max_queued_requests=config.router.max_queued_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
    )
    return router.bind(config.model_dump(mode="json"), handles)
