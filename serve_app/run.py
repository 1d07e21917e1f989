"""`frugalserve serve`: start the application from a `serve run` config and keep it up.

The same as `serve run CONFIG`, plus a readiness message with the URL and an example request,
and Ray Serve's high-throughput mode on by default (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in Ray's
processes): replicas talk over gRPC, user code runs on the replica's event loop, and the router
replica serves HTTP itself (direct ingress, from port 30000) besides Serve's proxy. On one machine
with one router replica that port is the fast endpoint (measured: docs/benchmarks.md); on a
cluster, Ray's HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`) serves it on the proxy's port.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from frugalserve.serve_app.config import APP_IMPORT_PATH, ConfigError, load_serve_config

THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def direct_ingress_url(app_name: str, host: str = "127.0.0.1", timeout_s: float = 30.0,
                       ) -> str | None:
    """The URL of `app_name`'s (first) router replica's own HTTP server, or None."""
    urls = direct_ingress_urls(app_name, host, timeout_s)
    return urls[0] if urls else None


def direct_ingress_urls(app_name: str, host: str = "127.0.0.1", timeout_s: float = 30.0,
                        ) -> list[str]:
    """The URLs of `app_name`'s router replicas' own HTTP servers (direct ingress); empty when
    the mode is off or no replica serves HTTP itself. Ray has no public getter for them yet: the
    controller's target groups (what Ray's HAProxy routes by) name the replicas' ports."""
    import ray  # Ray is imported by main() only once the config is read
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = _get_global_client()
            if client is None:
                return []
            controller = client._controller
            groups = ray.get(controller.get_target_groups.remote(app_name), timeout=10)
        except Exception:  # noqa: BLE001 - no such API in this Ray: the proxy is the endpoint
            return []
        direct = [t.port for g in groups if str(g.protocol).upper().endswith("HTTP")
                  for t in g.targets if t.name.startswith("SERVE_REPLICA")]  # not the proxies
        if direct:
            return [f"http://{host}:{p}" for p in sorted(direct)]
        if time.monotonic() > deadline:
            return []
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve serve", description=__doc__)
    parser.add_argument("--config", default="configs/local.yaml", help="Serve config YAML")
    parser.add_argument("--host", default=None, help="HTTP host (default: from the config)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: config)")
    parser.add_argument("--no-throughput-mode", action="store_true",
                        help="leave Ray Serve's high-throughput mode off (proxy only)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs Ray may hand out (default: max(8, cores), so every "
                        "replica of the demo config fits on a small machine)")
    args = parser.parse_args(argv)
    try:
        data = load_serve_config(args.config)
    except ConfigError as exc:
        print(f"frugalserve serve: {exc}", file=sys.stderr)
        return 2

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # ray (and the app, which imports it) only now: a bad config is reported without the seconds
    # that importing Ray takes
    import ray
    from frugalserve.serve_app.app import build_app
    from ray import serve

    http = dict(data.get("http_options") or {})
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or http.get("port", 8000)
    num_cpus = args.num_cpus or max(8, os.cpu_count() or 1)
    env = {} if args.no_throughput_mode else {THROUGHPUT_ENV: "1"}
    ray.init(num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env} if env else None)
    serve.start(http_options={"host": host, "port": port})
    for app in data["applications"]:
        if app.get("import_path") != APP_IMPORT_PATH:
            print(f"skipping application {app.get('name')!r}: not a frugalserve app")
            continue
        prefix = app.get("route_prefix", "/")
        serve.run(build_app(app.get("args") or {}), name=app.get("name", "frugalserve"),
                  route_prefix=prefix)
        url = f"http://{host}:{port}{prefix.rstrip('/')}"
        direct = direct_ingress_url(app.get("name", "frugalserve"), host) if env else None
        model = (app.get("args") or {}).get("default_model") or app["args"]["experts"][0]["name"]
        fast = (f"  high-throughput endpoint (the router replica's own HTTP server): {direct}/v1\n"
                if direct else "")
        print(
            f"\nfrugalserve is ready at {url}/v1  (OpenAI API; Ctrl-C stops it)\n{fast}\n"
            f"  curl {direct or url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"What is 12+30?\"}}], \"max_tokens\": 16}}'\n\n"
            f"  metrics (Prometheus text, vLLM's names beside frugalserve's): {url}/metrics\n",
            flush=True,
        )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
