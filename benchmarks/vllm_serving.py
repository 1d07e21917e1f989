"""vLLM inside the application: our attention backend (CUSTOM) against vLLM's own backends on the
same zoo models, through HTTP, in one run.

    python benchmarks/vllm_serving.py [--models tier-l,expert-facts]
        [--backends CUSTOM,TRITON_ATTN,FLASH_ATTN] [--modes graphs,eager] [--levels 1,32,64]
        [--max-tokens 64] [--prompts 150] [--out benchmarks/results/vllm-h200.json]

One application holds every variant as its own expert (`engine.backend: vllm`, a share of the one
GPU each, `kv_cache_memory_bytes` fixed so the variants start side by side), plus the model on
frugalserve's own transformers engine as the reference. Per variant:

- greedy agreement: the model's test-split prompts (temperature 0, `evaluate.MAX_TOKENS` tokens)
  against the transformers engine's answers; a mismatch is called a near-tie when the reference's
  top-2 logprobs at the first differing token are within `--tie-margin`;
- accuracy of those answers on the task suite's grader (the ALiBi check for the Falcon expert);
- tokens/s, TTFT and inter-token latency at each client count, fixed output length (ignore_eos);
- the memory profile and the autoscaling signal (`record_autoscaling_stats`) the replica reported
  at its fullest during the largest level, read from vLLM's KV cache.

Pairs that cannot run are listed with the reason instead of a row (`--skip`, default: FLASH_ATTN on
ALiBi models: vLLM serves ALiBi through FlashAttention-2 only, and on Hopper its FLASH_ATTN backend
is FlashAttention-3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
from common import free_port
from serving import level

GiB = 1 << 30
DEFAULT_SKIP = {"FLASH_ATTN": "alibi"}


def variant_name(model: str, backend: str, mode: str) -> str:
    return f"{model}-{backend.lower().replace('_', '-')}-{mode}"


def deployment_name(expert: str) -> str:  # as serve_app.app names an expert's deployment
    return expert if expert.startswith("expert-") else f"expert-{expert}"


def model_info(model: str) -> dict:
    from frugalserve.experts.spec import resolve_model_path

    config = json.loads((Path(resolve_model_path(f"builtin:{model}")) / "config.json").read_text())
    return {"path": str(resolve_model_path(f"builtin:{model}")), "arch": config.get("model_type"),
            "alibi": bool(config.get("alibi")),
            "domains": config.get("frugalserve_domains") or _domains(model)}


def _domains(model: str) -> list[str]:
    from frugalserve.experts.zoo import tasks

    for d in tasks.DOMAINS:
        if model == f"expert-{d}":
            return [d]
    return list(tasks.DOMAINS)


def build_config(models: list[str], backends: list[str], modes: list[str], skip: dict[str, str],
                 share: float | None, kv_bytes: int, max_seqs: int, levels: list[int]):
    """The application's config, the vLLM variants in it, the pairs skipped, and the GPU share of
    each replica (`share`, or 0.9 of the GPU split evenly over every replica)."""
    experts, variants, skipped = [], [], []
    for m in models:
        info = model_info(m)
        experts.append({
            "name": f"{m}-frugalserve",
            "engine": {"model": f"builtin:{m}", "dtype": "bfloat16",
                       "kv_cache": {"memory_budget_bytes": kv_bytes}},
            "deployment": {"max_ongoing_requests": 4 * max(levels), "autoscaling": {"enabled": False},
                           "resources": {"num_cpus": 1}},
        })
        for b in backends:
            why = skip.get(b)
            if why == "alibi" and info["alibi"]:
                skipped.append({"model": m, "backend": b, "reason": "vLLM serves ALiBi through "
                                "FlashAttention-2 only; on Hopper FLASH_ATTN is FlashAttention-3"})
                continue
            for mode in modes:
                name = variant_name(m, b, mode)
                variants.append({"name": name, "model": m, "backend": b, "mode": mode, **info})
                experts.append({
                    "name": name,
                    "engine": {"model": f"builtin:{m}", "backend": "vllm", "dtype": "bfloat16",
                               "vllm": {"attention_backend": b, "enforce_eager": mode == "eager",
                                        "kv_cache_memory_bytes": kv_bytes, "max_num_seqs": max_seqs}},
                    "deployment": {"max_ongoing_requests": 4 * max(levels),
                                   "autoscaling": {"enabled": False},
                                   "resources": {"num_cpus": 1}},
                })
    share = share or round(0.9 / len(experts), 3)
    for e in experts:
        e["deployment"]["resources"]["num_gpus"] = share
        if e["engine"].get("backend") == "vllm":  # vLLM's start-up check: its share must be free
            e["engine"]["vllm"]["gpu_memory_utilization"] = min(share, 0.05)
    config = {"gpus": "always", "default_model": experts[0]["name"],
              "router": {"num_cpus": 2, "max_ongoing_requests": 8 * max(levels)}, "experts": experts}
    return config, variants, skipped, share


def answers(url: str, model: str, prompts: list[str], max_tokens: int, top: int) -> list[dict]:
    """Greedy answers with per-token logprobs (and the top-`top` alternatives where asked)."""
    def one(p: str) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": p}], "temperature": 0,
                "max_tokens": max_tokens, "logprobs": True}
        if top:
            body["top_logprobs"] = top
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:600]}")
        choice = r.json()["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        return {"text": choice["message"]["content"] or "", "tokens": [c["token"] for c in content],
                "top": [[t["logprob"] for t in c.get("top_logprobs") or []] for c in content]}

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, prompts))


def agreement(ref: list[dict], got: list[dict], margin: float) -> dict:
    same, ties, other = 0, 0, []
    for i, (a, b) in enumerate(zip(ref, got)):
        if a["text"] == b["text"]:
            same += 1
            continue
        k = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                 min(len(a["tokens"]), len(b["tokens"])))
        top = a["top"][k] if k < len(a["top"]) else []
        gap = top[0] - top[1] if len(top) >= 2 else float("nan")
        if gap == gap and gap <= margin:
            ties += 1
        else:
            other.append({"prompt": i, "at_token": k, "reference_top2_gap": gap,
                          "reference": a["text"][:80], "got": b["text"][:80]})
    n = len(ref)
    return {"prompts": n, "identical": same, "near_ties": ties, "greedy_match_rate": same / n,
            "match_or_tie_rate": (same + ties) / n, "unexplained": other[:10]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tier-l,expert-facts")
    p.add_argument("--backends", default="CUSTOM,TRITON_ATTN,FLASH_ATTN")
    p.add_argument("--modes", default="graphs,eager", help="graphs: vLLM's CUDA graphs; eager: none")
    p.add_argument("--levels", default="1,32,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (min 16)")
    p.add_argument("--prompts", type=int, default=150, help="test-split prompts for agreement")
    p.add_argument("--tie-margin", type=float, default=0.1, help="logprob gap of a near-tie")
    p.add_argument("--skip", default="FLASH_ATTN=alibi", help="BACKEND=alibi: skip on ALiBi models")
    p.add_argument("--gpu-share", type=float, default=None, help="GPU share per replica "
                   "(default: 0.9 / number of replicas)")
    p.add_argument("--kv-bytes", type=int, default=GiB)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--ray-cpus", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm-h200.json"))
    args = p.parse_args(argv)
    models, backends = args.models.split(","), args.backends.split(",")
    modes, levels = args.modes.split(","), [int(x) for x in args.levels.split(",")]
    skip = dict(kv.split("=", 1) for kv in args.skip.split(",") if kv)

    config, variants, skipped, share = build_config(models, backends, modes, skip, args.gpu_share,
                                                    args.kv_bytes, args.max_num_seqs, levels)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import vllm
    from frugalserve.experts.zoo import evaluate, tasks
    from frugalserve.serve_app.app import build_app
    from frugalserve.serve_app.run import THROUGHPUT_ENV, direct_ingress_urls
    from ray import serve

    env = {THROUGHPUT_ENV: "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for k in ("VLLM_USE_FLASHINFER_SAMPLER", "PYTHONPATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    ray.init(num_cpus=args.ray_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"starting {len(config['experts'])} experts ({share} GPU each)...", file=sys.stderr)
    t0 = time.perf_counter()
    serve.run(build_app(config), name="bench", route_prefix="/")
    startup_s = time.perf_counter() - t0
    print(f"  up in {startup_s:.0f} s", file=sys.stderr)
    url = (direct_ingress_urls("bench") or [f"http://127.0.0.1:{port}"])[0]

    refs: dict[str, dict] = {}
    for m in models:
        info = model_info(m)
        test = tasks.generate("test", args.prompts, domains=tuple(info["domains"]))
        ref = answers(url, f"{m}-frugalserve", [t.prompt for t in test], evaluate.MAX_TOKENS, 2)
        acc = sum(tasks.is_correct(a["text"], t.answer) for a, t in zip(ref, test)) / len(test)
        refs[m] = {"tasks": test, "answers": ref, "accuracy": acc}
        print(f"  {m} on the transformers engine: accuracy {acc:.3f} on {len(test)} test prompts",
              file=sys.stderr)

    rows = []
    for v in variants:
        handle = serve.get_deployment_handle(deployment_name(v["name"]), app_name="bench")
        ref = refs[v["model"]]
        got = answers(url, v["name"], [t.prompt for t in ref["tasks"]], evaluate.MAX_TOKENS, 0)
        agree = agreement(ref["answers"], got, args.tie_margin)
        acc = sum(tasks.is_correct(a["text"], t.answer) for a, t in zip(got, ref["tasks"])) / len(got)
        for c in levels:
            peak: dict = {}
            poll = asyncio.Event()

            async def watch(handle=handle, peak=peak, poll=poll) -> None:
                while not poll.is_set():
                    s = await asyncio.to_thread(lambda: handle.record_autoscaling_stats.remote().result())
                    if s and s.get("frugalserve_bytes_in_use", 0) >= peak.get("frugalserve_bytes_in_use", -1):
                        peak.clear()
                        peak.update(s)
                    await asyncio.sleep(0.2)

            async def run(c=c, watch=watch, poll=poll, name=v["name"]) -> dict:
                task = asyncio.create_task(watch())
                try:
                    return await level([url], name, c, max(16, args.requests * c), args.max_tokens)
                finally:
                    poll.set()
                    await task

            row = asyncio.run(run())
            row.update({"backend": v["backend"], "mode": v["mode"], "model": v["model"],
                        "arch": v["arch"], "alibi": v["alibi"], "expert": v["name"],
                        "greedy_match_rate": agree["greedy_match_rate"],
                        "match_or_tie_rate": agree["match_or_tie_rate"],
                        "accuracy": acc, "reference_accuracy": ref["accuracy"]})
            if c == max(levels):
                stats = handle.stats.remote().result()
                row["memory"] = stats.get("memory")
                row["autoscaling_signal_peak"] = dict(peak)
                row["agreement"] = agree
            rows.append(row)
            print(f"  {v['name']:<28} {c:>3} clients: {row['tokens_per_s']:9.1f} tok/s, TTFT p50 "
                  f"{row['ttft_p50_ms']:6.1f} ms, greedy {agree['greedy_match_rate']:.3f} "
                  f"(+ties {agree['match_or_tie_rate']:.3f}), acc {acc:.3f}", file=sys.stderr)

    # The transformers engine's own serving figures, same levels, as the house reference.
    for m in models:
        for c in levels:
            row = asyncio.run(level([url], f"{m}-frugalserve", c, max(16, args.requests * c),
                                    args.max_tokens))
            row.update({"backend": "frugalserve-engine", "mode": "graphs", "model": m,
                        "expert": f"{m}-frugalserve", "greedy_match_rate": 1.0,
                        "accuracy": refs[m]["accuracy"], "reference_accuracy": refs[m]["accuracy"]})
            rows.append(row)
    serve.shutdown()
    ray.shutdown()

    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        device = None
    result = {
        "date": date.today().isoformat(), "machine": device or platform.machine(),
        "vllm": vllm.__version__, "gpu_share": share, "kv_cache_memory_bytes": args.kv_bytes,
        "max_tokens": args.max_tokens, "startup_s": startup_s, "skipped": skipped, "rows": rows,
        "command": "python benchmarks/vllm_serving.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nvLLM {vllm.__version__} in the application, {result['machine']}, {args.max_tokens} "
          f"tokens per request (ignore_eos), {share} GPU per replica")
    print(f"{'model':<13} {'backend':<19} {'mode':<6} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} "
          f"{'ITL p50':>8} {'greedy':>7} {'acc':>6}")
    for r in rows:
        print(f"{r['model']:<13} {r['backend']:<19} {r['mode']:<6} {r['concurrency']:>7} "
              f"{r['tokens_per_s']:>9.0f} {r['ttft_p50_ms']:>7.1f}ms {r['itl_p50_ms']:>6.2f}ms "
              f"{r['greedy_match_rate']:>7.3f} {r['accuracy']:>6.3f}")
    for s in skipped:
        print(f"not run: {s['model']} on {s['backend']}: {s['reason']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
