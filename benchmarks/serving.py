"""Serving through HTTP: the real application, streamed chat requests of a fixed output length
(ignore_eos), at 1/8/32/64 concurrent clients.

    python benchmarks/serving.py [--experts tier-s,tier-m,tier-l] [--target tier-l]
        [--levels 1,8,32,64] [--max-tokens 64] [--num-gpus 0.3] [--out FILE]

Per level: tokens/s over the level's wall time, time to first token (first content chunk) p50 /
p99, inter-token latency p50 / p99 (each request's (end - first token) / (tokens - 1)), and the
engine's mean running batch over the level (sequences per engine step, from the expert's stats).
Peer in the same run for the router's hop: the expert's deployment handle called directly,
sequentially, against the same requests through HTTP (router added = HTTP p50 - handle p50).
Every expert of `--experts` is deployed (on GPUs: `--num-gpus` each, all on one GPU if < 1); the
load goes to `--target`. With `--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (Ray Serve's
high-throughput mode) the load goes to the router replica's own HTTP server (direct ingress, what
Ray's HAProxy forwards to), and the hop is measured through it and through Serve's proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import httpx
from common import free_port, pct


def prompt(i: int) -> str:
    return f"Request {i}: what is {17 * i + 3} + {29 * i + 11}?"


async def one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt(i)}]}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - t0
            if '"usage":{' in line:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - t0
    first = end if first is None else first
    itl = (end - first) / (tokens - 1) if tokens > 1 else float("nan")
    return {"ttft": first, "e2e": end, "tokens": tokens, "itl": itl}


async def level(urls: list[str], model: str, clients: int, n: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, spread round-robin over `urls` (as a load balancer in front
    of several router replicas would), each sending its next request when the last one ends."""
    todo = iter(range(n))
    results: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:
            results.append(await one(client, model, i, max_tokens))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    pools = [httpx.AsyncClient(base_url=u, timeout=600, limits=limits) for u in urls]
    try:
        for client in pools:
            await one(client, model, -1, max_tokens)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(pools[c % len(pools)]) for c in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        for client in pools:
            await client.aclose()
    tokens = sum(r["tokens"] for r in results)
    ms = [1000 * r["ttft"] for r in results]
    itl = [1000 * r["itl"] for r in results if r["itl"] == r["itl"]]
    return {"concurrency": clients, "requests": n, "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ms, 0.5), "ttft_p99_ms": pct(ms, 0.99),
            "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99),
            "latency_p50_ms": pct([1000 * r["e2e"] for r in results], 0.5)}


def router_hop(url: str, handle, model: str, n: int, max_tokens: int) -> dict:
    from frugalserve.experts.engine import GenerationRequest, SamplingParams

    via_http, via_handle = [], []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n + 5):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": prompt(i)}]}
            t0 = time.perf_counter()
            c.post("/v1/chat/completions", json=body).raise_for_status()
            t1 = time.perf_counter()
            req = GenerationRequest(messages=({"role": "user", "content": prompt(i)},),
                                    params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            handle.generate.remote(req).result()
            t2 = time.perf_counter()
            if i >= 5:  # warm-up
                via_http.append(1000 * (t1 - t0))
                via_handle.append(1000 * (t2 - t1))
    return {"requests": n, "max_tokens": max_tokens, "http_p50_ms": pct(via_http, 0.5),
            "handle_p50_ms": pct(via_handle, 0.5),
            "router_added_p50_ms": pct(via_http, 0.5) - pct(via_handle, 0.5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", default="tier-l", help="builtin zoo models to deploy")
    p.add_argument("--target", default="tier-l")
    p.add_argument("--levels", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (min 16)")
    p.add_argument("--hop-requests", type=int, default=100)
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPU share per expert replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per expert replica")
    p.add_argument("--ray-cpus", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--admission-delay", type=float, default=None)
    p.add_argument("--stream-interval", type=float, default=None)
    p.add_argument("--serve-env", default="", help="KEY=VALUE,... set in Ray's processes (e.g. "
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    p.add_argument("--router-replicas", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from frugalserve.serve_app.app import build_app
    from frugalserve.serve_app.run import THROUGHPUT_ENV, direct_ingress_urls
    from ray import serve

    env = dict(kv.split("=", 1) for kv in args.serve_env.split(",") if kv)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    scheduler = {"max_batch_size": args.max_batch_size}
    if args.admission_delay is not None:
        scheduler["admission_delay_s"] = args.admission_delay
    if args.stream_interval is not None:
        scheduler["stream_interval_s"] = args.stream_interval
    experts = [{
        "name": name,
        "engine": {"model": f"builtin:{name}", "scheduler": scheduler},
        "deployment": {"max_ongoing_requests": 2 * max(levels), "autoscaling": {"enabled": False},
                       "resources": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}},
    } for name in args.experts.split(",")]
    serve.run(build_app({"gpus": "auto", "default_model": args.target,
                         "router": {"num_cpus": 1, "max_ongoing_requests": 4 * max(levels),
                                    "num_replicas": args.router_replicas},
                         "experts": experts}), name="bench", route_prefix="/")
    proxy_url = url = f"http://127.0.0.1:{port}"
    directs = direct_ingress_urls("bench") if env.get(THROUGHPUT_ENV) == "1" else []
    direct = directs[0] if directs else None
    if direct is not None:
        url = direct  # the levels go to the router replicas' own HTTP servers
    handle = serve.get_deployment_handle(f"expert-{args.target}", app_name="bench")
    info = handle.info.remote().result()
    print(f"  {args.target}: {info['batching']} batching, attention {info['attention']}",
          file=sys.stderr)
    rows = []
    for c in levels:
        before = handle.stats.remote().result()
        row = asyncio.run(level(directs or [url], args.target, c, max(16, args.requests * c),
                                args.max_tokens))
        after = handle.stats.remote().result()
        steps = after.get("steps", 0) - before.get("steps", 0)
        seqs = after.get("seqs_per_step_total", 0) - before.get("seqs_per_step_total", 0)
        row["mean_running_batch"] = seqs / steps if steps else float("nan")
        rows.append(row)
        print(f"  {c:>3} clients: {row['tokens_per_s']:9.1f} tok/s, TTFT p50 "
              f"{row['ttft_p50_ms']:.1f} ms, running batch {row['mean_running_batch']:.1f}",
              file=sys.stderr)
    hop = router_hop(url, handle, args.target, args.hop_requests, 16)
    hop["ingress"] = "direct" if direct else "proxy"
    if direct is not None:
        via_proxy = router_hop(proxy_url, handle, args.target, args.hop_requests, 16)
        hop["proxy_http_p50_ms"] = via_proxy["http_p50_ms"]
        hop["proxy_router_added_p50_ms"] = via_proxy["router_added_p50_ms"]
    serve.shutdown()
    ray.shutdown()

    base = rows[0]
    for row in rows:
        row["ratio_vs_c1"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ttft_ratio_vs_c1"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
        row["router_added_p50_ms"] = hop["router_added_p50_ms"]
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        device = None
    result = {
        "date": date.today().isoformat(),
        "machine": device or f"{platform.machine()} {os.cpu_count()} CPUs",
        "experts": args.experts, "target": args.target, "num_gpus": args.num_gpus,
        "serve_env": env, "router_replicas": args.router_replicas,
        "ingress": "direct (the router replica's HTTP server)" if direct else "Serve's proxy",
        "batching": info["batching"], "attention": info["attention"],
        "max_tokens": args.max_tokens, "rows": rows, "router_hop": hop,
        "command": "python benchmarks/serving.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nserving {args.target} through HTTP ({info['batching']} batching), "
          f"{args.max_tokens} tokens per request (ignore_eos), {result['machine']}")
    print(f"{'clients':>7} {'tokens/s':>10} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'batch':>6}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['tokens_per_s']:>10.1f} {r['ratio_vs_c1']:>5.1f}x "
              f"{r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms {r['itl_p50_ms']:>6.2f}ms "
              f"{r['itl_p99_ms']:>6.2f}ms {r['mean_running_batch']:>6.1f}")
    print(f"router hop at 1 client ({hop['ingress']} ingress): HTTP p50 {hop['http_p50_ms']:.1f} "
          f"ms, handle p50 {hop['handle_p50_ms']:.1f} ms: +{hop['router_added_p50_ms']:.1f} ms")
    if "proxy_http_p50_ms" in hop:
        print(f"  through Serve's proxy: HTTP p50 {hop['proxy_http_p50_ms']:.1f} ms: "
              f"+{hop['proxy_router_added_p50_ms']:.1f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
