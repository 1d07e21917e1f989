"""`frugalserve serve`: start the application from a `serve run` config and keep it up.

The same as `serve run CONFIG`, plus a readiness message with the URL and an example request.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from frugalserve.serve_app.config import APP_IMPORT_PATH, ConfigError, load_serve_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve serve", description=__doc__)
    parser.add_argument("--config", default="configs/local.yaml", help="Serve config YAML")
    parser.add_argument("--host", default=None, help="HTTP host (default: from the config)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: config)")
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
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    for app in data["applications"]:
        if app.get("import_path") != APP_IMPORT_PATH:
            print(f"skipping application {app.get('name')!r}: not a frugalserve app")
            continue
        prefix = app.get("route_prefix", "/")
        serve.run(build_app(app.get("args") or {}), name=app.get("name", "frugalserve"),
                  route_prefix=prefix)
        url = f"http://{host}:{port}{prefix.rstrip('/')}"
        model = (app.get("args") or {}).get("default_model") or app["args"]["experts"][0]["name"]
        print(
            f"\nfrugalserve is ready at {url}/v1  (OpenAI API; Ctrl-C stops it)\n\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"What is 12+30?\"}}], \"max_tokens\": 16}}'\n",
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
