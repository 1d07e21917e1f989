"""The application builder that `serve run` imports: `frugalserve.serve_app.app:build_app`.

One deployment per expert, named after it, plus the router ingress holding their handles.
"""

from __future__ import annotations

import logging
from typing import Any

from frugalserve.serve_app.config import AppConfig, ExpertConfig, parse_app_config
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


def autoscaling_config(expert: ExpertConfig) -> dict[str, Any]:
    """Serve's autoscaling_config for an expert: our memory-per-token policy with its knobs in
    policy_kwargs. Serve's own delays are 0: Ray 2.60 wraps custom policies with its delay logic,
    and the policy keeps its own hysteresis (delays would otherwise add up)."""
    a = expert.deployment.autoscaling
    floor = a.target_ongoing_requests or 2.0 * expert.local.scheduler.max_batch_size
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


def expert_deployment_options(expert: ExpertConfig, use_gpus: bool) -> dict[str, Any]:
    """Serve's deployment options for a local expert, from its `deployment` section (and its
    engine's, for vLLM's GPUs and the autoscaler's request floor)."""
    d, name = expert.deployment, expert.name
    actor: dict[str, Any] = {"num_cpus": d.resources.num_cpus}
    if use_gpus and d.resources.num_gpus > 0:
        actor["num_gpus"] = d.resources.num_gpus
    if d.resources.memory_bytes:
        actor["memory"] = d.resources.memory_bytes
    options = {
        "name": f"expert-{name}" if not name.startswith("expert-") else name,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": actor,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
    }
    if expert.local.backend == "vllm":  # vLLM takes whole GPUs, one per tensor-parallel rank
        from frugalserve.experts.vllm_engine import deployment_resources

        res = deployment_resources(expert.local, d.resources.num_cpus, name,
                                   gpus=d.resources.num_gpus if use_gpus else 1.0)
        actor.update(res.pop("ray_actor_options"))
        options.update(res)
    if d.autoscaling.enabled:
        options["autoscaling_config"] = autoscaling_config(expert)
    else:
        options["num_replicas"] = d.num_replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    config: AppConfig = parse_app_config(dict(args or {}))
    use_gpus = config.gpus == "always" or (config.gpus == "auto" and _cluster_has_gpus())
    handles = {}
    for expert in config.experts:
        if expert.is_remote:
            continue  # remote experts are called by the router, no deployment
        options = expert_deployment_options(expert, use_gpus)
        deployment = serve.deployment(ExpertServer).options(**options)
        handles[expert.name] = deployment.bind(expert.model_dump(mode="json"))
        logger.info("expert %s: %s", expert.name, options["ray_actor_options"])
    router = serve.deployment(Router).options(
        name="router",
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        max_queued_requests=config.router.max_queued_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
        # a new `user_config.artifact` (serve deploy) swaps the artifact without a restart
        **({"user_config": {"artifact": config.routing.artifact}} if config.routing.artifact else {}),
    )
    return router.bind(config.model_dump(mode="json"), handles)
