"""Batching gain: tokens/s through HTTP at concurrency 1 against 16 and 32, one expert.

Starts a real Ray Serve application with one expert (default: the demo Llama), sends the same
number of chat requests at each concurrency with a fixed `max_tokens`, and prints a table with
the ratio to concurrency 1. Writes JSON beside it.

    python benchmarks/batching.py [--model builtin:demo-llama] [--max-tokens 32] [--requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_level(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Request {i}: what is {i} + {2 * i}?"}],
            })
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, -1)  # warm-up
        tokens = 0
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, i) for i in range(n)])
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="builtin:demo-llama")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--levels", default="1,16,32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs for the expert replica")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batching.json"))
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from frugalserve.serve_app.app import build_app
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    name = "bench"
    serve.run(build_app({
        "gpus": "auto",
        "router": {"num_cpus": 0.1},
        "experts": [{
            "name": name, "model": args.model, "device": args.device,
            "batching": {"max_batch_size": max(levels), "batch_wait_timeout_s": 0.005},
            "max_ongoing_requests": max(levels) * 2,
            "resources": {"num_cpus": args.num_cpus, "num_gpus": 1},
        }],
    }), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    handle = serve.get_deployment_handle("expert-bench", app_name="bench")
    rows = []
    for c in levels:
        n = max(args.requests, c) if c > 1 else max(8, args.requests // 4)
        seen = len(handle.stats.remote().result()["batch_sizes"])
        row = asyncio.run(run_level(url, name, c, n, args.max_tokens))
        sizes = handle.stats.remote().result()["batch_sizes"][seen + 1:]  # after the warm-up
        row["mean_engine_batch"] = sum(sizes) / len(sizes) if sizes else 0.0
        rows.append(row)
        print(f"  concurrency {c:>3}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    info = handle.info.remote().result()
    serve.shutdown()
    ray.shutdown()

    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_vs_c1"] = row["tokens_per_s"] / base
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "model": args.model,
        "attention_backend": info["attention_backend"],
        "max_tokens": args.max_tokens,
        "rows": rows,
        "command": "python benchmarks/batching.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nbatching through HTTP, {args.model}, max_tokens={args.max_tokens}, "
          f"{result['machine']}")
    print(f"{'concurrency':>11} {'requests':>8} {'tokens/s':>10} {'p50 latency':>12} "
          f"{'engine batch':>12} {'vs c=1':>7}")
    for row in rows:
        print(f"{row['concurrency']:>11} {row['requests']:>8} {row['tokens_per_s']:>10.1f} "
              f"{row['latency_p50_s'] * 1000:>10.0f}ms {row['mean_engine_batch']:>12.1f} "
              f"{row['ratio_vs_c1']:>6.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
