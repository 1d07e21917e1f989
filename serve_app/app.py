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


def expert_deployment_options(spec, use_gpus: bool) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus}
    if use_gpus and spec.resources.num_gpus > 0:
        actor["num_gpus"] = spec.resources.num_gpus
    if spec.resources.memory_bytes:
        actor["memory"] = spec.resources.memory_bytes
    return {
        "name": f"expert-{spec.name}" if not spec.name.startswith("expert-") else spec.name,
        "num_replicas": spec.num_replicas,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": actor,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }


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
