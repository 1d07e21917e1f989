"""Paged decode on an fp8 (e4m3) KV cache against the bf16 cache: kernel time, tokens/s and achieved
bandwidth, and the greedy agreement of a zoo model served with either cache.

    python benchmarks/decode_fp8.py [--out benchmarks/results/decode-fp8-h200.json] [--no-model]

Kernel: `paged_decode_attention`, bf16 queries, 32 query / 8 KV heads, d 128, one query token per
sequence, ALiBi on and off, page 16, shuffled block tables, at B=64 S=4k and B=16 S=16k. The same
unit-normal K/V are stored as bf16 and as fp8 with per-KV-head scales (amax x 2 / 448, what the engine's
calibration gives). Timed with the launcher's defaults (what the engine runs), and over a small sweep
of splits x key-tile sizes (best reported beside). tokens/s = B / kernel time (one layer's attention per
decode step); bandwidth = K+V bytes read / time (fp8: 1 byte per element, plus the scales); the device copy
bandwidth is measured in the same run. The fp8 output is checked against the float64 reference on the
same dequantized cache. Target: fp8 >= 1.8x the bf16 tokens/s at both shapes.

Model: the zoo's tier-l (and expert-text, Falcon ALiBi) in the paged engine on the GPU, bf16 weights,
bf16 cache vs fp8 cache (scales calibrated at load), the same --prompts test prompts, greedy,
--max-tokens new tokens: the share of prompts whose completions are identical (target >= 98 %), and
decode tokens/s of each at batch 64 (ignore_eos).
Seeded inputs, warm-up, medians of triton.testing.do_bench; prints a table, writes JSON.
"""

# ruff: noqa: B023  (closures are benchmarked at once inside each loop iteration)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import triton
from frugalserve.kernels import alibi_slopes
from frugalserve.kernels.decode import decode_block_n, default_num_splits, paged_decode_attention
from frugalserve.kernels.kv_cache import FP8_MAX, quantize_fp8
from frugalserve.kernels.reference import paged_decode_reference
from triton.testing import do_bench

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = [(64, 4096), (16, 16384)]
MODELS = Path(__file__).resolve().parents[1] / "experts" / "zoo" / "models"


def bench(fn, rep=200):
    try:
        return do_bench(fn, warmup=25, rep=rep, return_mode="median")
    except Exception as exc:  # a configuration that cannot run is reported as null
        print(f"  failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return None


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e9  # bytes read + written, TB/s


def kernel_rows(meta, sweep=True):
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    for B, S in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(B * S)
        P = B * (S // PAGE) + 1
        k = torch.randn(P, PAGE, HKV, D, device="cuda", generator=g)
        v = torch.randn(P, PAGE, HKV, D, device="cuda", generator=g)
        ks, vs = (x.abs().amax(dim=(0, 1, 3)) * 2 / FP8_MAX for x in (k, v))
        caches = {"bf16": (k.to(torch.bfloat16), v.to(torch.bfloat16), None, None),
                  "fp8": (quantize_fp8(k, ks), quantize_fp8(v, vs), ks, vs)}
        del k, v
        tables = (torch.randperm(P - 1, device="cuda", generator=g)[: B * (S // PAGE)] + 1).view(B, -1).int()
        ctx = torch.full((B,), S, dtype=torch.int32, device="cuda")
        q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        slopes = alibi_slopes(HQ, device="cuda")
        res = {}
        for name, (kc, vc, kscale, vscale) in caches.items():
            elt = kc.element_size()
            nbytes = 2 * B * S * HKV * D * elt  # K and V, read once
            for alibi in (True, False):
                s = slopes if alibi else None

                def run(**kw):
                    return paged_decode_attention(q, kc, vc, tables, ctx, alibi_slopes=s, max_context_len=S,
                                                  k_scale=kscale, v_scale=vscale, **kw)

                ms = bench(run)
                best = (ms, "default")
                sweep_log = []
                if sweep:
                    for splits in (2, 4, 8, 16):
                        for bn in (32, 64, 128, 256):
                            t = bench(lambda: run(num_splits=splits, block_n=bn), rep=50)
                            sweep_log.append({"splits": splits, "block_n": bn, "ms": t})
                            if t is not None and (best[0] is None or t < best[0]):
                                best = (t, f"splits={splits} block_n={bn}")
                err = None
                if name == "fp8" and alibi:
                    out = run().double()
                    ref = paged_decode_reference(q, kc, vc, tables, ctx, alibi_slopes=s,
                                                 compute_dtype=torch.float64, k_scale=kscale, v_scale=vscale)
                    err = float((out - ref.double()).abs().max())
                res[(name, alibi)] = ms
                rows.append({
                    "kind": "decode-kernel", "cache": name, "batch": B, "seqlen": S, "num_heads": HQ,
                    "num_kv_heads": HKV, "head_dim": D, "page_size": PAGE, "alibi": alibi, "ms": ms,
                    "tokens_per_s": None if ms is None else B / ms * 1e3,
                    "TB_per_s": None if ms is None else nbytes / ms / 1e9, "copy_bandwidth_TB_per_s": copy_bw,
                    "default_block_n": decode_block_n(D, name == "fp8", 16),
                    "default_num_splits": default_num_splits(B, HKV, S, decode_block_n(D, name == "fp8", 16), sms),
                    "best_ms": best[0], "best_config": best[1], "sweep": sweep_log,
                    "max_abs_err_vs_float64_reference": err, **meta,
                })
                print(f"decode {name} B={B} S={S} alibi={alibi}: {ms} ms, "
                      f"{rows[-1]['TB_per_s']} TB/s (best {best[0]} ms: {best[1]})"
                      + (f", max |err| vs float64 {err:.2e}" if err is not None else ""), flush=True)
        for alibi in (True, False):
            b16, f8 = res[("bf16", alibi)], res[("fp8", alibi)]
            speedup = None if (b16 is None or f8 is None) else b16 / f8
            for r in rows[-4:]:
                if r["alibi"] == alibi and r["cache"] == "fp8":
                    r["speedup_vs_bf16"] = speedup
        del caches
        torch.cuda.empty_cache()
    return rows


def prompts(n: int) -> list[str]:
    base = ["What is 12 + 30?", "Reverse the word serve.", "What is the capital of Zorvia?",
            "Sort the letters of frugal.", "What is 4821 + 77?", "x" * 50, "Who founded Velandor?",
            "Spell paged backwards.", "What is 7 * 8?", "hi"]
    extra = [f"What is {17 * i + 3} + {29 * i + 11}?" if i % 3 == 0 else
             f"Reverse the word {['cache', 'kernel', 'router', 'expert', 'tensor'][i % 5]}." if i % 3 == 1 else
             f"Tell me about the town of {['Zorvia', 'Velandor', 'Quillmar', 'Ostrava'][i % 4]} number {i}."
             for i in range(max(0, n - len(base)))]
    return (base + extra)[:n]


def model_rows(names, n_prompts, max_tokens, meta):
    from frugalserve.experts.engine import GenerationRequest, SamplingParams
    from frugalserve.experts.paged.engine import PagedConfig, PagedEngine

    rows = []
    texts = prompts(n_prompts)
    for name in names:
        def reqs(ignore_eos=False, n=None):
            return [GenerationRequest(messages=({"role": "user", "content": t},), request_id=f"r{i}",
                                      params=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
                    for i, t in enumerate(texts if n is None else prompts(n))]

        outs, speed = {}, {}
        for cache in ("bf16", "fp8"):
            eng = PagedEngine.from_path(MODELS / name, device="cuda", dtype="bfloat16",
                                        config=PagedConfig(max_num_seqs=64, kv_cache_dtype="auto" if cache == "bf16"
                                                           else "fp8"))
            outs[cache] = asyncio.run(eng.generate(reqs()))
            batch = reqs(ignore_eos=True, n=64)
            asyncio.run(eng.generate(batch))  # warm-up
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                done = asyncio.run(eng.generate(batch))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            speed[cache] = sum(c.completion_tokens for c in done) / statistics.median(times)
            kv_bytes = eng.memory_profile().kv_bytes_per_token
            eng.close()
            speed[cache + "_kv_bytes_per_token"] = kv_bytes
            torch.cuda.empty_cache()
        same = sum(a.token_ids == b.token_ids for a, b in zip(outs["fp8"], outs["bf16"]))
        first_diff = []
        for a, b in zip(outs["fp8"], outs["bf16"]):
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            if n is not None or a.token_ids != b.token_ids:
                first_diff.append(n if n is not None else min(len(a.token_ids), len(b.token_ids)))
        rows.append({
            "kind": "model", "model": name, "prompts": len(texts), "max_tokens": max_tokens,
            "identical_greedy": same, "agreement": same / len(texts), "first_divergence_steps": first_diff,
            "tokens_per_s_bf16_batch64": speed["bf16"], "tokens_per_s_fp8_batch64": speed["fp8"],
            "kv_bytes_per_token_bf16": speed["bf16_kv_bytes_per_token"],
            "kv_bytes_per_token_fp8": speed["fp8_kv_bytes_per_token"], **meta,
        })
        print(f"model {name}: {same}/{len(texts)} identical greedy completions; tokens/s at batch 64: "
              f"bf16 {speed['bf16']:.0f}, fp8 {speed['fp8']:.0f}", flush=True)
    return rows


def print_table(rows):
    print("\n| B | S | ALiBi | bf16 ms | fp8 ms | fp8 / bf16 tokens/s | bf16 TB/s | fp8 TB/s | fp8 best (config) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] != "decode-kernel" or r["cache"] != "fp8":
            continue
        b = next(x for x in rows if x["kind"] == "decode-kernel" and x["cache"] == "bf16"
                 and (x["batch"], x["seqlen"], x["alibi"]) == (r["batch"], r["seqlen"], r["alibi"]))
        f = lambda x, p=3: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
        print(f"| {r['batch']} | {r['seqlen']} | {r['alibi']} | {f(b['ms'])} | {f(r['ms'])} | "
              f"**{f(r.get('speedup_vs_bf16'), 2)}×** | {f(b['TB_per_s'], 2)} | {f(r['TB_per_s'], 2)} | "
              f"{f(r['best_ms'])} ({r['best_config']}) |")
    for r in rows:
        if r["kind"] == "model":
            print(f"| model {r['model']} | {r['identical_greedy']}/{r['prompts']} identical "
                  f"({100 * r['agreement']:.1f} %) | tokens/s batch 64: bf16 {r['tokens_per_s_bf16_batch64']:.0f}, "
                  f"fp8 {r['tokens_per_s_fp8_batch64']:.0f} | KV bytes/token {r['kv_bytes_per_token_bf16']:.0f} → "
                  f"{r['kv_bytes_per_token_fp8']:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode-fp8-h200.json"))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--models", default="tier-l,expert-text")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    meta = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}
    rows = kernel_rows(meta, sweep=not args.no_sweep)
    if not args.no_model:
        rows += model_rows(args.models.split(","), args.prompts, args.max_tokens, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print_table(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
