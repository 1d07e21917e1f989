"""Chaos under load on loopback (`make chaos`): replicas killed, a remote expert failing.

    python benchmarks/chaos.py [--kills 6] [--kill-every 5] [--users 6] [--steady 15] [--after 10]
        [--fault-rate 0.3] [--out benchmarks/results/chaos-cpu.json]

Deploys `demo-llama` with two replicas and `hosted`, a remote expert on a local stub provider
that fails a share of its calls (500, hang past `remote.timeout_s`, reset connection) and falls
back to `demo-llama`; steady locust load (cluster/load/locustfile.py, half the requests streamed)
over both; after `--steady` seconds one of the two replicas is killed with `ray.kill` every
`--kill-every` seconds (once Serve has replaced the last one), `--kills` times. Prints and writes
the report of `frugalserve.cluster.load.chaos` with the issue's targets, each met or missed.
Ray Serve runs in its high-throughput mode, as `frugalserve serve` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

from common import free_port


def app_args(provider_url: str, deadline_s: float) -> dict:
    return {
        "gpus": "never", "default_model": "demo-llama",
        "router": {"num_cpus": 0.5, "request_timeout_s": deadline_s, "max_retries": 2},
        "experts": [
            {"name": "demo-llama",
             "engine": {"model": "builtin:demo-llama", "scheduler": {"max_batch_size": 32}},
             "deployment": {"resources": {"num_cpus": 0.5}, "num_replicas": 2,
                            "autoscaling": {"enabled": False}}},
            {"name": "hosted", "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 2.0,
             "fallbacks": ["demo-llama"],
             "remote": {"base_url": provider_url, "model": "stub-model", "logprobs": False,
                        "max_retries": 0, "timeout_s": 1.0, "allowed_fails": 3,
                        "cooldown_s": 5.0}},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--kill-every", type=float, default=5.0)
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--steady", type=float, default=15.0, help="seconds of load before the first kill")
    p.add_argument("--after", type=float, default=10.0, help="seconds of load after the last fault")
    p.add_argument("--deadline", type=float, default=10.0, help="router.request_timeout_s")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--fault-rate", type=float, default=0.3, help="share of the remote's calls that fail")
    p.add_argument("--ray-cpus", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/chaos-cpu.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from frugalserve.cluster.load.chaos import (
        ChaosPlan,
        FlakyProvider,
        format_report,
        run_chaos,
        targets,
    )
    from frugalserve.serve_app.app import build_app
    from frugalserve.serve_app.run import THROUGHPUT_ENV
    from ray import serve

    provider = FlakyProvider(mode="random", fault_rate=args.fault_rate, hang_s=args.deadline + 5)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {THROUGHPUT_ENV: "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(provider.url, args.deadline)), name="chaos", route_prefix="/")
    plan = ChaosPlan(app="chaos", deployment="expert-demo-llama", models="demo-llama,hosted",
                     users=args.users, steady_s=args.steady, kills=args.kills,
                     kill_every_s=args.kill_every, after_s=args.after, deadline_s=args.deadline,
                     max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_chaos(f"http://127.0.0.1:{port}", plan, Path(tmp),
                           log=lambda s: print(s, file=sys.stderr))
    serve.shutdown()
    ray.shutdown()
    provider.close()
    report["remote_calls"] = dict(sorted(provider.calls.items()))
    report["targets"] = targets(report)
    report.update(date=date.today().isoformat(),
                  machine=f"{platform.machine()} {os.cpu_count()} CPUs",
                  command="python benchmarks/chaos.py " + " ".join(argv or sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"  the remote's calls: {report['remote_calls']}")
    print(f"wrote {args.out}")
    return 0 if all(report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
