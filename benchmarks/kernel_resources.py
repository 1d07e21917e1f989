"""Kernel resources without a GPU: compile the Triton kernels offline for a CUDA target and report, per
tile shape, shared memory and registers per thread and register spill (stack bytes per thread).

    python benchmarks/kernel_resources.py [--arch 90] [--dtype bf16] [--out benchmarks/results/kernel-resources-sm90.json]

Needs only triton with its bundled NVIDIA toolchain (cuobjdump), no CUDA device. Prefill rows use causal +
ALiBi varlen launches with 4 query heads per KV head; decode rows 8 query heads per KV head; paged-prefill rows
ALiBi, 4 query heads per KV head, page 16. Written
against Triton 3.9's `triton.compile(ASTSource(...), target=...)`; other versions may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

import importlib  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

prefill = importlib.import_module("frugalserve.kernels.prefill")
decode = importlib.import_module("frugalserve.kernels.decode")
kv_cache = importlib.import_module("frugalserve.kernels.kv_cache")
paged_prefill = importlib.import_module("frugalserve.kernels.paged_prefill")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
        if sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"shared_kb": round(kernel.metadata.shared / 1024, 1), "regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(stack.group(1)) if stack else None}


def prefill_rows(dtype: str, arch: int):
    types = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "Slopes": "*fp32",
             "CuQ": "*i32", "CuK": "*i32", "KvLo": "*i32", "KScale": "*fp32", "VScale": "*fp32", "qk_scale": "fp32"}
    for d in (64, 128, 256):
        block_d = prefill._block_d(d)
        cls = prefill._d_class(block_d)
        for shape in dict.fromkeys(prefill._TUNE_SHAPES[cls] + prefill._FIXED_SHAPES[cls]):
            m, n, w, s = shape
            cx = dict(GROUP=4, PACK=4, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=m, BLOCK_N=n, CAUSAL=True,
                      USE_ALIBI=True, VARLEN=True, HAS_KV_LO=False, KV_FP8=False, TMA=False)
            fixed = shape == prefill._FIXED_SHAPES[cls][0]
            yield {"kernel": "prefill", "head_dim": d, "shape": list(shape), "fixed": fixed,
                   **resources(prefill._prefill_kernel.fn, types, cx, w, s, arch)}


def decode_rows(dtype: str, arch: int, fp8: bool = False):
    cache = "fp8e4nv" if fp8 else dtype
    types = {"Q": f"*{dtype}", "KC": f"*{cache}", "VC": f"*{cache}", "Out": f"*{dtype}", "Slopes": "*fp32",
             "PartO": "*fp32", "PartML": "*fp32", "BT": "*i32", "Ctx": "*i32", "KScale": "*fp32",
             "VScale": "*fp32", "qk_scale": "fp32"}
    for d in (40, 128, 256):
        for rows in (16, 64, 128):
            block_d = max(16, triton.next_power_of_2(d))
            block_n, warps = decode.decode_block_n(d, fp8, rows), decode._num_warps(rows, block_d)
            cx = dict(GROUP=8, QLEN=rows // 8, BLOCK_R=rows, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n,
                      PAGE=16, USE_ALIBI=True, SPLIT=True, KV_FP8=fp8)
            yield {"kernel": "decode-fp8-cache" if fp8 else "decode", "head_dim": d,
                   "shape": [rows, block_n, warps, 2], "fixed": True,
                   **resources(decode._decode_kernel, types, cx, warps, 2, arch)}


# Shapes the paged prefill kernel's tiles were chosen from (paged_prefill._SHAPES holds those, per BLOCK_D class
# <= 64, 128, 256); the 16-row shapes are for decode-only launches. Rows use 4 query heads per KV head, page 16.
PAGED_PREFILL_CANDIDATES = {
    128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
          (64, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2),
          (16, 32, 4, 2), (16, 64, 4, 2)],
}


def paged_prefill_rows(dtype: str, arch: int):
    types = {"Q": f"*{dtype}", "KC": f"*{dtype}", "VC": f"*{dtype}", "O": f"*{dtype}", "Slopes": "*fp32",
             "BT": "*i32", "CuQ": "*i32", "SeqLens": "*i32", "KScale": "*fp32", "VScale": "*fp32",
             "qk_scale": "fp32"}
    for d in (24, 40, 64, 128, 256):
        block_d = paged_prefill._block_d(d)
        chosen = set(paged_prefill._SHAPES[max(64, block_d)].values())
        for shape in PAGED_PREFILL_CANDIDATES[128 if block_d <= 128 else 256]:
            m, n, w, s = shape
            cx = dict(GROUP=4, PACK=4, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=m, BLOCK_N=n, PAGE=16, USE_ALIBI=True,
                      KV_FP8=False)
            yield {"kernel": "paged-prefill", "head_dim": d, "shape": list(shape), "fixed": shape in chosen,
                   **resources(paged_prefill._paged_prefill_kernel, types, cx, w, s, arch)}


def kv_write_rows(dtype: str, arch: int):
    types = {"K": f"*{dtype}", "V": f"*{dtype}", "KC": f"*{dtype}", "VC": f"*{dtype}", "Slots": "*i64",
             "KScale": "*fp32", "VScale": "*fp32", "num_slots": "i64"}
    for d, hkv in ((8, 8), (128, 8), (256, 16)):
        block_d = triton.next_power_of_2(d)
        block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // block_d))
        cx = dict(PAGE=16, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, FP8=False, FP8_MAX=448.0)
        yield {"kernel": "kv-write", "head_dim": d, "shape": [block_h, block_d, 4, 3], "fixed": True,
               **resources(kv_cache._kernel(), types, cx, 4, 3, arch)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", nargs="+", default=["prefill", "decode", "kv-write", "paged-prefill"],
                    choices=("prefill", "decode", "decode-fp8", "kv-write", "paged-prefill"))
    args = ap.parse_args()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"kernel-resources-sm{args.arch}.json")
    rows = []
    gens = {"prefill": prefill_rows, "decode": decode_rows, "kv-write": kv_write_rows,
            "paged-prefill": paged_prefill_rows,
            "decode-fp8": lambda dtype, arch: decode_rows(dtype, arch, fp8=True)}
    for gen in (gens[k] for k in args.kernels):
        for row in gen(args.dtype, args.arch):
            rows.append(row)
            print(f"{row['kernel']:8} d={row['head_dim']:3} shape={tuple(row['shape'])!s:18} "
                  f"{'fixed' if row['fixed'] and 'prefill' in row['kernel'] else '':5} "
                  f"smem={row['shared_kb']:5.1f} KB regs={row['regs']} spill={row['spill_bytes']} B", flush=True)
    meta = {"arch": args.arch, "dtype": args.dtype, "triton": triton.__version__}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
