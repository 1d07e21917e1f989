"""`frugalserve kuberay`: a KubeRay RayService manifest (`ray.io/v1`) from the `serve run` config.

The manifest's `serveConfigV2` is the same Serve config that `serve run configs/local.yaml` reads,
with one documented change: `http_options.host` becomes `0.0.0.0`, because a Serve proxy bound to
127.0.0.1 inside a pod is unreachable from the Kubernetes Service in front of it. Nothing else in
the config is touched (`--pin-gpus` is an opt-in second change, see below).

The cluster has a CPU-only head (`num-cpus: "0"`, so no replica lands on it) and one worker group
sized from the experts: every local expert replica asks `deployment.resources.num_gpus` GPUs, replicas are
packed first-fit-decreasing into pods of `--gpus-per-worker` GPUs (default 1), and the group has
exactly that many pods (`nvidia.com/gpu` in requests and limits). Remote experts (a `remote`
section) need no GPU. Ray's metrics export port (8080) is open on every pod for Prometheus.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from frugalserve.serve_app.config import (
    APP_IMPORT_PATH,
    ConfigError,
    load_serve_config,
    parse_app_config,
)

from frugalserve import __version__

METRICS_PORT = 8080
CLUSTER_HOST = "0.0.0.0"
DEFAULT_GPU_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery


def _ray_version() -> str:
    try:
        return version("ray")
    except PackageNotFoundError:
        return "2.60.0"


@dataclass(frozen=True)
class ClusterOptions:
    """What a user may override; the defaults fit one GPU per worker pod."""

    name: str = "frugalserve"
    namespace: str | None = None
    image: str = f"frugalserve:{__version__}"
    ray_version: str = _ray_version()
    gpus_per_worker: int = 1
    gpu_type: str | None = None
    gpu_node_label: str = DEFAULT_GPU_LABEL
    worker_cpus: str = "8"
    worker_memory: str = "32Gi"
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    pin_gpus: bool = False
    throughput_mode: bool = True  # RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in every Ray container


@dataclass(frozen=True)
class WorkerPlan:
    """The worker group: `pods` pods of `gpus_per_pod` GPUs; `cpus_per_pod` is the most any pod's
    replicas reserve, `cpus_total` what all replicas (router included) reserve."""

    pods: int
    gpus_per_pod: int
    cpus_per_pod: float
    cpus_total: float

    @property
    def gpus(self) -> int:
        return self.pods * self.gpus_per_pod


class KubeRayError(ValueError):
    """A config that cannot be turned into a cluster with the given options."""


# -- the Serve config ------------------------------------------------------------------------


def serve_config_for_cluster(serve_config: dict[str, Any], pin_gpus: bool = False) -> dict:
    """The config to embed as `serveConfigV2`: a copy with `http_options.host` = 0.0.0.0 and,
    with `pin_gpus`, `args.gpus: always` in frugalserve applications."""
    out = copy.deepcopy(serve_config)
    out.setdefault("http_options", {})["host"] = CLUSTER_HOST
    if pin_gpus:
        for app in out["applications"]:
            if app.get("import_path") == APP_IMPORT_PATH:
                app.setdefault("args", {})["gpus"] = "always"
    return out


def check_serve_config(serve_config: dict[str, Any]) -> None:
    """Validate with Ray's own `ServeDeploySchema`, and reject keys it would silently ignore."""
    # ray: only this check needs it; the manifest itself is written without importing Ray
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    unknown = sorted(set(serve_config) - set(ServeDeploySchema.model_fields))
    for i, app in enumerate(serve_config.get("applications") or []):
        extra = set(app) - set(ServeApplicationSchema.model_fields)
        unknown += [f"applications[{i}].{k}" for k in sorted(extra)]
    if unknown:
        raise KubeRayError(f"unknown Serve config fields (Ray ignores them): {unknown}")
    try:
        ServeDeploySchema.model_validate(serve_config)
    except Exception as exc:  # noqa: BLE001 - pydantic's error already names the field
        raise KubeRayError(f"Serve rejects the config: {exc}") from None


# -- sizing ----------------------------------------------------------------------------------


def _cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity ("8", "7.5", "7500m") in cores."""
    q = str(quantity).strip()
    try:
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)
    except ValueError:
        raise KubeRayError(f"not a CPU quantity: {quantity!r} (e.g. 8, 7.5, 7500m)") from None


def expert_apps(serve_config: dict[str, Any]):
    """The validated `AppConfig` of every frugalserve application in a Serve config."""
    return [parse_app_config(app.get("args") or {}, where=f"applications[{i}].args")
            for i, app in enumerate(serve_config["applications"])
            if app.get("import_path") == APP_IMPORT_PATH]


def replica_count(spec, bound: str) -> int:
    """Replicas of an expert at the autoscaling bound `min` or `max` (fixed without autoscaling)."""
    a = spec.deployment.autoscaling
    if not a.enabled:
        return spec.deployment.num_replicas
    if bound == "max":
        return a.max_replicas
    return max(a.min_replicas, a.initial_replicas or 0)


def plan_workers(apps, gpus_per_worker: int = 1, worker_cpus: float = 8.0,
                 bound: str = "min") -> WorkerPlan:
    """Pack every local expert replica into worker pods (first fit, largest GPU share first),
    counting each autoscaled expert at its `min` or `max` replicas.

    With no GPU demand (`gpus: never`, or every `num_gpus` 0) the pods are CPU pods, as many as
    the replicas' CPUs need."""
    if gpus_per_worker < 1:
        raise KubeRayError("--gpus-per-worker must be at least 1")
    replicas: list[tuple[float, float, str]] = []  # (gpus, cpus, expert)
    router_cpus = 0.0
    for config in apps:
        router_cpus += config.router.num_cpus * config.router.num_replicas
        for spec in config.experts:
            if spec.is_remote:
                continue
            res = spec.deployment.resources
            gpus = res.num_gpus if config.gpus != "never" else 0.0
            replicas += [(gpus, res.num_cpus, spec.name)] * replica_count(spec, bound)
    cpus_total = router_cpus + sum(c for _, c, _ in replicas)
    if not any(g > 0 for g, _, _ in replicas):
        pods = max(1, math.ceil(cpus_total / worker_cpus))
        return WorkerPlan(pods, 0, min(cpus_total, worker_cpus), cpus_total)
    pods_gpus: list[float] = []
    pods_cpus: list[float] = []
    for gpus, cpus, name in sorted(replicas, key=lambda r: -r[0]):
        if gpus > gpus_per_worker:
            raise KubeRayError(f"expert {name!r} asks {gpus} GPUs per replica but worker pods "
                               f"have {gpus_per_worker}: raise --gpus-per-worker")
        slot = next((i for i, used in enumerate(pods_gpus)
                     if used + gpus <= gpus_per_worker + 1e-9), None)
        if slot is None:
            pods_gpus.append(0.0)
            pods_cpus.append(0.0)
            slot = len(pods_gpus) - 1
        pods_gpus[slot] += gpus
        pods_cpus[slot] += cpus
    plan = WorkerPlan(len(pods_gpus), gpus_per_worker, max(pods_cpus), cpus_total)
    if plan.cpus_per_pod > worker_cpus or plan.cpus_total > plan.pods * worker_cpus:
        raise KubeRayError(
            f"worker pods have {worker_cpus:g} CPUs but the replicas reserve {plan.cpus_per_pod:g} "
            f"on one pod ({plan.cpus_total:g} in all, router included): raise --worker-cpus")
    return plan


# -- the manifest ----------------------------------------------------------------------------


def _resources(cpus: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": str(memory)}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _secret_env(apps, name: str) -> list[dict[str, Any]]:
    """Remote experts' API keys from the Secret `<name>-api-keys` (optional: absent keys stay
    unset, as they would on a laptop)."""
    envs = sorted({s.remote.api_key_env for config in apps for s in config.experts
                   if s.remote is not None and s.remote.api_key_env})
    return [{"name": env, "valueFrom": {"secretKeyRef": {
        "name": f"{name}-api-keys", "key": env, "optional": True}}} for env in envs]


def _container(name: str, image: str, ports: list[tuple[str, int]], resources: dict,
               env: list[dict]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "ports": [{"containerPort": port, "name": pname, "protocol": "TCP"}
                  for pname, port in ports],
        "resources": resources,
    }
    if env:
        container["env"] = env
    return container


def build_manifest(serve_config: dict[str, Any], opts: ClusterOptions) -> dict[str, Any]:
    """The RayService as a dict; `serveConfigV2` is the YAML text of the cluster's Serve config."""
    cluster_config = serve_config_for_cluster(serve_config, opts.pin_gpus)
    check_serve_config(cluster_config)
    apps = expert_apps(cluster_config)
    plan = plan_workers(apps, opts.gpus_per_worker, _cpus(opts.worker_cpus))
    most = plan_workers(apps, opts.gpus_per_worker, _cpus(opts.worker_cpus), bound="max")
    env = _secret_env(apps, opts.name)
    if opts.throughput_mode:  # Ray Serve's high-throughput mode, as `frugalserve serve` runs it
        env = [{"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"}, *env]
    serve_port = int(cluster_config["http_options"].get("port", 8000))

    head_ports = [("gcs", 6379), ("dashboard", 8265), ("client", 10001),
                  ("serve", serve_port), ("metrics", METRICS_PORT)]
    head = {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0",
                           "metrics-export-port": str(METRICS_PORT)},
        "template": {"spec": {"containers": [_container(
            "ray-head", opts.image, head_ports,
            _resources(opts.head_cpus, opts.head_memory), env)]}},
    }
    worker_start = {"metrics-export-port": str(METRICS_PORT)}
    pod_spec: dict[str, Any] = {"containers": [_container(
        "ray-worker", opts.image, [("serve", serve_port), ("metrics", METRICS_PORT)],
        _resources(opts.worker_cpus, opts.worker_memory, plan.gpus_per_pod), env)]}
    if plan.gpus_per_pod:
        worker_start["num-gpus"] = str(plan.gpus_per_pod)
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if opts.gpu_type:
            pod_spec["nodeSelector"] = {opts.gpu_node_label: opts.gpu_type}
    worker = {
        "groupName": "gpu-workers" if plan.gpus_per_pod else "cpu-workers",
        "replicas": plan.pods,
        "minReplicas": plan.pods,
        "maxReplicas": max(plan.pods, most.pods),
        "numOfHosts": 1,
        "rayStartParams": worker_start,
        "template": {"spec": pod_spec},
    }
    metadata: dict[str, Any] = {"name": opts.name,
                                "labels": {"app.kubernetes.io/name": "frugalserve"}}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": dump_yaml(cluster_config),
            "rayClusterConfig": {
                "rayVersion": opts.ray_version,
                # Serve adds expert replicas by memory per token; KubeRay's autoscaler adds
                # the pods they need, up to the experts' max_replicas.
                "enableInTreeAutoscaling": most.pods > plan.pods,
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded Serve config) as `|` blocks, so they read as YAML."""


def _str(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False,
                     width=100, allow_unicode=True)


def render(manifest: dict[str, Any], command: str, pin_gpus: bool = False) -> str:
    changes = f"http_options.host = {CLUSTER_HOST}" + (" and args.gpus = always" if pin_gpus else "")
    header = (f"# Generated by `{command}`; regenerate rather than edit.\n"
              f"# serveConfigV2 is the Serve config that `serve run` reads, with {changes}.\n")
    return header + dump_yaml(manifest)


# -- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = ClusterOptions()
    p = argparse.ArgumentParser(prog="frugalserve kuberay", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/local.yaml", help="the `serve run` YAML")
    p.add_argument("--out", help="write the manifest here instead of standard output")
    p.add_argument("--name", default=d.name, help="RayService name (default %(default)s)")
    p.add_argument("--namespace", help="metadata.namespace (default: kubectl's current)")
    p.add_argument("--image", default=d.image,
                   help="image with Ray and frugalserve installed (default %(default)s)")
    p.add_argument("--ray-version", default=d.ray_version, help="default: the installed Ray")
    p.add_argument("--gpus-per-worker", type=int, default=d.gpus_per_worker,
                   help="GPUs per worker pod (default %(default)s)")
    p.add_argument("--gpu-type", help="schedule GPU workers on nodes whose --gpu-node-label "
                   "has this value, e.g. NVIDIA-H100-80GB-HBM3")
    p.add_argument("--gpu-node-label", default=d.gpu_node_label,
                   help="node label for --gpu-type (default %(default)s; GKE: "
                   "cloud.google.com/gke-accelerator)")
    p.add_argument("--worker-cpus", default=d.worker_cpus, help="default %(default)s")
    p.add_argument("--worker-memory", default=d.worker_memory, help="default %(default)s")
    p.add_argument("--head-cpus", default=d.head_cpus, help="default %(default)s")
    p.add_argument("--head-memory", default=d.head_memory, help="default %(default)s")
    p.add_argument("--pin-gpus", action="store_true",
                   help="set `gpus: always` in the embedded config: with `auto` the app is "
                   "built on the head and sees no GPU if worker pods join late")
    p.add_argument("--no-throughput-mode", action="store_true",
                   help="leave Ray Serve's high-throughput mode off (on by default: "
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the head and worker containers)")
    return p


def _argv_text(argv: list[str]) -> str:
    """The command as run, for the manifest's header (`--out` left out: it is not content)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            shown.append(arg)
    return shlex.join(["frugalserve", "kuberay", *shown])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    opts = ClusterOptions(
        name=args.name, namespace=args.namespace, image=args.image,
        ray_version=args.ray_version, gpus_per_worker=args.gpus_per_worker,
        gpu_type=args.gpu_type, gpu_node_label=args.gpu_node_label,
        worker_cpus=args.worker_cpus, worker_memory=args.worker_memory,
        head_cpus=args.head_cpus, head_memory=args.head_memory, pin_gpus=args.pin_gpus,
        throughput_mode=not args.no_throughput_mode,
    )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", opts.name):
        print(f"frugalserve kuberay: --name {opts.name!r} is not a Kubernetes name "
              "(lower-case letters, digits, '-')", file=sys.stderr)
        return 2
    try:
        manifest = build_manifest(load_serve_config(args.config), opts)
    except (ConfigError, KubeRayError) as exc:
        print(f"frugalserve kuberay: {exc}", file=sys.stderr)
        return 2
    text = render(manifest, _argv_text(argv), opts.pin_gpus)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
