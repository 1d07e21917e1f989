"""Attention benchmark: frugalserve Triton kernels vs FlexAttention and SDPA on the same inputs.

    python benchmarks/attention.py [--out benchmarks/results/attention-h200.json] [--quick] [--no-model]

Prefill: bf16, 32 query heads, 8 KV heads, d=128, causal, S = 1k..16k with batch x S = 16k tokens;
peers (each named in the table and the JSON rows, see PEERS): FlexAttention (compiled, ALiBi score_mod,
causal block mask, enable_gqa), SDPA with a materialized ALiBi bias, and SDPA without ALiBi three ways:
forced to its FLASH backend, its default choice (cuDNN on Hopper with torch 2.11), and forced to cuDNN.
Decode: B=64 S=4k and B=16 S=16k, one query token, paged cache (page 16); K+V bytes read per second,
against the device copy bandwidth.
Ours twice: the default kernel and its opt-in tensor-descriptor (TMA) variant (`ours_tma`).
Model: a Falcon-architecture ALiBi model (bf16, random weights) prefill, transformers' default vs ours.
Seeded inputs, warm-up, median of triton.testing.do_bench; prints a table, writes JSON rows.
"""

# ruff: noqa: B023, F821  (closures are benchmarked at once inside each loop iteration, then deleted)
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from frugalserve.kernels import alibi_slopes
from frugalserve.kernels.decode import default_num_splits, paged_decode_attention
from frugalserve.kernels.prefill import _prefill_kernel, flash_attention
from triton.testing import do_bench

HQ, HKV, D = 32, 8, 128
for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _name):  # one compiled flex kernel per shape; past the limit flex runs eager
        setattr(torch._dynamo.config, _name, 1024)
DATE = "2026-11-29"
# JSON key -> what ran (every peer on the same inputs in the same process)
PEERS = {
    "flex": "torch.compile(flex_attention): ALiBi score_mod (ALiBi rows) or none, causal BlockMask, enable_gqa",
    "sdpa_bias": "SDPA (default backend) with a materialized bf16 ALiBi + causal bias, K/V repeated to 32 heads",
    "sdpa_flash_noalibi": "SDPA forced to SDPBackend.FLASH_ATTENTION, causal, no ALiBi, enable_gqa",
    "sdpa_default_noalibi": "SDPA with no backend forced (its own choice), causal, no ALiBi, enable_gqa",
    "sdpa_cudnn_noalibi": "SDPA forced to SDPBackend.CUDNN_ATTENTION, causal, no ALiBi (enable_gqa, or K/V "
                          "repeated to 32 heads where cuDNN refuses GQA: see sdpa_cudnn_kv)",
}


def bench(fn, rep=200):
    try:
        return do_bench(fn, warmup=25, rep=rep, return_mode="median")
    except Exception as exc:  # a peer that cannot run this shape is reported as null
        print(f"  peer failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return None


def tflops(ms, flops):
    return None if ms is None else flops / ms / 1e9


def prefill_rows(seqlens, meta):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for S in seqlens:
        B = max(1, 16384 // S)
        g = torch.Generator(device="cuda").manual_seed(S)
        q = torch.randn(B, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        slopes = alibi_slopes(HQ, device="cuda")
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D] for the peers
        flops = 4 * B * HQ * S * S * D / 2  # causal: half the score matrix

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        torch._dynamo.reset()
        bm = create_block_mask(causal, None, None, S, S, device="cuda")
        res = {}
        res["ours_alibi"] = bench(lambda: flash_attention(q, k, v, causal=True, alibi_slopes=slopes))
        cfg_alibi = str(_prefill_kernel.best_config)
        res["ours_noalibi"] = bench(lambda: flash_attention(q, k, v, causal=True))
        cfg_noalibi = str(_prefill_kernel.best_config)
        # the opt-in tensor-descriptor (TMA) variant, autotuned over the same shapes (null where it cannot run)
        res["ours_tma_alibi"] = bench(lambda: flash_attention(q, k, v, causal=True, alibi_slopes=slopes, tma=True))
        res["ours_tma_noalibi"] = bench(lambda: flash_attention(q, k, v, causal=True, tma=True))
        res["flex_alibi"] = bench(lambda: flex(qt, kt, vt, score_mod=alibi_mod, block_mask=bm, enable_gqa=True))
        res["flex_noalibi"] = bench(lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            res["sdpa_flash"] = bench(lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True))
        res["sdpa_default"] = bench(lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True))
        kr, vr = kt.repeat_interleave(HQ // HKV, 1), vt.repeat_interleave(HQ // HKV, 1)
        cudnn_kv = "gqa"
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            res["sdpa_cudnn"] = bench(lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True))
            if res["sdpa_cudnn"] is None:
                cudnn_kv = "repeated"
                res["sdpa_cudnn"] = bench(lambda: sdpa(qt, kr, vr, is_causal=True))
        pos = torch.arange(S, device="cuda")
        bias = (slopes.view(HQ, 1, 1) * (pos.view(1, 1, S) - pos.view(1, S, 1))).to(torch.bfloat16)
        bias = bias.masked_fill(pos.view(1, 1, S) > pos.view(1, S, 1), float("-inf"))[None]
        res["sdpa_bias"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kr, vr, attn_mask=bias), rep=100)
        del bias, kr, vr
        torch.cuda.empty_cache()
        t = {key: tflops(ms, flops) for key, ms in res.items()}
        for alibi in (True, False):
            rows.append({
                "kind": "prefill", "batch": B, "seqlen": S, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
                "alibi": alibi, "ours": t["ours_alibi" if alibi else "ours_noalibi"],
                "ours_tma": t["ours_tma_alibi" if alibi else "ours_tma_noalibi"],
                "flex": t["flex_alibi" if alibi else "flex_noalibi"],
                "sdpa_bias": t["sdpa_bias"] if alibi else None, "sdpa_flash_noalibi": t["sdpa_flash"],
                "sdpa_default_noalibi": t["sdpa_default"], "sdpa_cudnn_noalibi": t["sdpa_cudnn"],
                "sdpa_cudnn_kv": cudnn_kv, "peers": PEERS,
                "unit": "TFLOP/s", "config": cfg_alibi if alibi else cfg_noalibi, **meta,
            })
        print(f"prefill S={S} B={B}: " + ", ".join(f"{k}={v:.1f}" if v else f"{k}=None" for k, v in t.items()),
              flush=True)
    return rows


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e9  # bytes read + written, TB/s


def decode_rows(shapes, meta, page=16, sweep=True):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    copy_bw = copy_bandwidth()
    rows, sweep_log = [], []
    for B, S in shapes:
        g = torch.Generator(device="cuda").manual_seed(B * S)
        pages_per_seq = S // page
        P = B * pages_per_seq
        k_cache = torch.randn(P, page, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v_cache = torch.randn(P, page, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        block_tables = torch.randperm(P, device="cuda", generator=g).view(B, pages_per_seq).int()
        ctx = torch.full((B,), S, dtype=torch.int32, device="cuda")
        q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        slopes = alibi_slopes(HQ, device="cuda")
        nbytes = 2 * B * S * HKV * D * 2  # K and V, bf16, read once

        def tbs(ms):
            return None if ms is None else nbytes / ms / 1e9

        res = {}
        torch._dynamo.reset()
        res["ours_alibi"] = bench(lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, ctx,
                                                                 alibi_slopes=slopes, max_context_len=S))
        res["ours_noalibi"] = bench(lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, ctx,
                                                                   max_context_len=S))
        best = (res["ours_alibi"], "default")
        if sweep:
            for splits in (1, 2, 4, 8, 16, 32):
                for bn in (32, 64, 128):
                    for w in (4,):
                        for st in (2, 3, 4):
                            ms = bench(lambda: paged_decode_attention(
                                q, k_cache, v_cache, block_tables, ctx, alibi_slopes=slopes, max_context_len=S,
                                num_splits=splits, block_n=bn, num_warps=w, num_stages=st), rep=50)
                            if ms is not None:
                                sweep_log.append({"B": B, "S": S, "splits": splits, "block_n": bn, "warps": w,
                                                  "stages": st, "TB/s": tbs(ms)})
                                if ms < best[0]:
                                    best = (ms, f"splits={splits} block_n={bn} warps={w} stages={st}")
        # peers on a contiguous (non-paged) cache [B, Hkv, S, D]
        kc = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        vc = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
        qt = q.transpose(1, 2).contiguous()

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - (S - 1))

        res["flex_alibi"] = bench(lambda: flex(qt, kc, vc, score_mod=alibi_mod, enable_gqa=True))
        res["flex_noalibi"] = bench(lambda: flex(qt, kc, vc, enable_gqa=True))
        res["sdpa_noalibi"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kc, vc, enable_gqa=True))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            res["sdpa_flash"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kc, vc, enable_gqa=True))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            res["sdpa_cudnn"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kc, vc, enable_gqa=True))
        bias = (slopes.view(1, HQ, 1, 1) * (torch.arange(S, device="cuda") - (S - 1))).to(torch.bfloat16)
        res["sdpa_bias"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kc, vc, attn_mask=bias, enable_gqa=True))
        t = {key: tbs(ms) for key, ms in res.items()}
        t["ours_best"] = tbs(best[0])
        for alibi in (True, False):
            rows.append({
                "kind": "decode", "batch": B, "seqlen": S, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
                "alibi": alibi, "ours": t["ours_alibi" if alibi else "ours_noalibi"],
                "ours_tma": t["ours_tma_alibi" if alibi else "ours_tma_noalibi"],
                "flex": t["flex_alibi" if alibi else "flex_noalibi"],
                "sdpa_bias": t["sdpa_bias"] if alibi else None, "sdpa_flash_noalibi": t["sdpa_flash"],
                "sdpa_default_noalibi": t["sdpa_noalibi"], "sdpa_cudnn_noalibi": t["sdpa_cudnn"],
                "sdpa_cudnn_kv": "gqa", "peers": {**PEERS, "note": "decode peers read a contiguous (non-paged) cache"},
                "unit": "TB/s", "copy_bandwidth": copy_bw, "page_size": page,
                "default_num_splits": default_num_splits(
                    B, HKV, S, num_sms=torch.cuda.get_device_properties(0).multi_processor_count),
                "ours_best_sweep": t["ours_best"] if alibi else None, "best_config": best[1] if alibi else None,
                **meta,
            })
        print(f"decode B={B} S={S}: " + ", ".join(f"{k}={v:.2f}" if v else f"{k}=None" for k, v in t.items())
              + f" (best: {best[1]}; copy {copy_bw:.2f} TB/s)", flush=True)
        del kc, vc, k_cache, v_cache
        torch.cuda.empty_cache()
    return rows, sweep_log


def model_rows(lengths, meta, layers=4):
    from frugalserve.kernels.hf import enable_for_model
    from transformers import FalconConfig, FalconModel

    cfg = FalconConfig(vocab_size=32000, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                       num_hidden_layers=layers, new_decoder_architecture=True, alibi=True, parallel_attn=True,
                       bias=False)
    rows = []
    for label in ("transformers", "ours"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = FalconModel(cfg).to(torch.bfloat16).eval()
        what = enable_for_model(model) if label == "ours" else f"attn_implementation={model.config._attn_implementation}"
        for S in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, S), device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with torch.no_grad():
                    ms = do_bench(lambda: model(ids, use_cache=False), warmup=1, rep=5, return_mode="median")
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            except torch.OutOfMemoryError:
                ms, peak = None, None
            rows.append({"kind": "model", "model": f"falcon-alibi {layers} layers, hidden 4096, 32q/8kv heads",
                         "path": label, "enabled": what, "batch": 1, "seqlen": S, "ms": ms, "peak_extra_gib": peak,
                         **meta})
            print(f"model {label} S={S}: {ms} ms, peak +{peak} GiB ({what})", flush=True)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    return rows


def print_table(rows):
    print("\n| kind | B | S | alibi | ours | flex | sdpa_bias | sdpa_flash_noalibi | sdpa_default_noalibi | "
          "sdpa_cudnn_noalibi | unit | ours/flex | ours/sdpa_flash | ours/sdpa_default | ours/sdpa_cudnn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "model":
            continue
        f = lambda x: "–" if x is None else f"{x:.2f}" if r["unit"] == "TB/s" else f"{x:.0f}"  # noqa: E731
        ratio = lambda a, b: "–" if (a is None or b is None) else f"{a / b:.2f}"  # noqa: E731
        print(f"| {r['kind']} | {r['batch']} | {r['seqlen']} | {r['alibi']} | {f(r['ours'])} | {f(r['flex'])} | "
              f"{f(r['sdpa_bias'])} | {f(r['sdpa_flash_noalibi'])} | {f(r.get('sdpa_default_noalibi'))} | "
              f"{f(r.get('sdpa_cudnn_noalibi'))} | {r['unit']} | {ratio(r['ours'], r['flex'])} | "
              f"{ratio(r['ours'], r['sdpa_flash_noalibi'])} | {ratio(r['ours'], r.get('sdpa_default_noalibi'))} | "
              f"{ratio(r['ours'], r.get('sdpa_cudnn_noalibi'))} |")
    for r in rows:
        if r["kind"] == "prefill":
            print(f"| prefill TMA variant | B={r['batch']} S={r['seqlen']} alibi={r['alibi']} | "
                  f"{r['ours_tma']} TFLOP/s (pointer loads: {r['ours']}) |")
    print("\npeers: " + "; ".join(f"{k} = {v}" for k, v in PEERS.items()))
    for r in rows:
        if r["kind"] == "model":
            print(f"| model {r['path']} | S={r['seqlen']} | {r['ms']} ms | peak +{r['peak_extra_gib']} GiB |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention-h200.json"))
    ap.add_argument("--quick", action="store_true", help="S=1k,4k only, no sweep")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    meta = {"date": DATE, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}
    seqlens = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    rows = prefill_rows(seqlens, meta)
    drows, sweep_log = decode_rows([(64, 4096), (16, 16384)], meta, sweep=not (args.quick or args.no_sweep))
    rows += drows
    if not args.no_model:
        rows += model_rows([8192, 16384], meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    if args.sweep_out:
        with open(args.sweep_out, "w") as fh:
            json.dump(sweep_log, fh, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
