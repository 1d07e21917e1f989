"""What the router costs in latency: the HTTP + router hop against calling the expert's
deployment handle directly, and time to first token of a streamed cascade against streaming
one tier directly.

    python benchmarks/router_latency.py [--config configs/local.yaml] [--requests 40]

Sequential requests (concurrency 1) so the numbers are latencies, not queueing. Peers in the
same run: the expert's handle without HTTP or router (hop), and direct streaming (TTFT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx
from common import free_port, pct


def ttft(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json={
            "model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": prompt}],
            "frugalserve": {"sticky": False}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--expert", default="tier-s", help="expert for the hop measurement")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/router-latency.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from frugalserve.experts.engine import GenerationRequest, SamplingParams
    from frugalserve.experts.zoo import tasks as T
    from frugalserve.serve_app.app import build_app
    from frugalserve.serve_app.config import load_serve_config
    from ray import serve

    app_args = load_serve_config(args.config)["applications"][0]["args"]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="frugalserve", route_prefix="/")
    handle = serve.get_deployment_handle(f"expert-{args.expert}", app_name="frugalserve")
    prompts = [t.prompt for t in T.generate("test", args.requests)]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def direct(prompt: str) -> float:
        req = GenerationRequest(messages=({"role": "user", "content": prompt},),
                                params=SamplingParams(max_tokens=args.max_tokens))
        t0 = time.perf_counter()
        handle.generate.remote(req).result()
        return time.perf_counter() - t0

    def via_router(prompt: str) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json={
            "model": args.expert, "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]})
        r.raise_for_status()
        return time.perf_counter() - t0

    for prompt in prompts[:3]:  # warm-up
        direct(prompt), via_router(prompt)
    hop = {"direct": [], "router": []}
    for prompt in prompts:  # interleaved, so drift hits both alike
        hop["direct"].append(direct(prompt))
        hop["router"].append(via_router(prompt))
    streams = {}
    for model in (args.expert, "tier-l", "cascade"):
        streams[model] = [ttft(client, model, pr, args.max_tokens) for pr in prompts]
    serve.shutdown()
    ray.shutdown()

    rows = {
        "hop_p50_ms": {k: 1000 * statistics.median(v) for k, v in hop.items()},
        "hop_p99_ms": {k: 1000 * pct(v, 0.99) for k, v in hop.items()},
        "ttft_p50_ms": {m: 1000 * statistics.median([t for t, _ in v]) for m, v in streams.items()},
        "ttft_p99_ms": {m: 1000 * pct([t for t, _ in v], 0.99) for m, v in streams.items()},
        "e2e_p50_ms": {m: 1000 * statistics.median([e for _, e in v]) for m, v in streams.items()},
    }
    added = rows["hop_p50_ms"]["router"] - rows["hop_p50_ms"]["direct"]
    result = {"date": date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "config": args.config,
              "expert": args.expert, "requests": args.requests, "max_tokens": args.max_tokens,
              **rows, "router_added_p50_ms": added,
              "command": "python benchmarks/router_latency.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nrouter latency, {result['machine']}, {args.requests} sequential requests, "
          f"max_tokens={args.max_tokens}")
    print(f"{'path':<34} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{args.expert + ' via handle (peer)':<34} {rows['hop_p50_ms']['direct']:>8.1f} "
          f"{rows['hop_p99_ms']['direct']:>8.1f}")
    print(f"{args.expert + ' via HTTP + router':<34} {rows['hop_p50_ms']['router']:>8.1f} "
          f"{rows['hop_p99_ms']['router']:>8.1f}")
    print(f"added by proxy + router at p50: {added:.1f} ms "
          f"({rows['hop_p50_ms']['router'] / rows['hop_p50_ms']['direct']:.2f}x)")
    print(f"\n{'streamed model':<34} {'TTFT p50':>8} {'TTFT p99':>8} {'e2e p50':>8}")
    for m in streams:
        print(f"{m:<34} {rows['ttft_p50_ms'][m]:>8.1f} {rows['ttft_p99_ms'][m]:>8.1f} "
              f"{rows['e2e_p50_ms'][m]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
