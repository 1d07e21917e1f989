"""The one place that decides between the Triton kernels and the PyTorch reference.

Rule: Triton on CUDA devices of compute capability >= 8.0 when `triton` imports; the reference
everywhere else (CPU, no Triton, older GPUs) and for inputs the kernel does not support (float32
attention, head dims outside checks.SUPPORTED_HEAD_DIMS, more than 128 query rows per KV head in
decode, arbitrary masks; paged prefill takes any number of query rows and heads per KV head).
`FRUGALSERVE_ATTENTION=reference` forces the reference; `FRUGALSERVE_ATTENTION=triton` forces the
kernels (with `TRITON_INTERPRET=1` that runs them on CPU).
`decide` is that rule as a pure function of the layout, answerable before any tensor exists; each
call's decision goes through it and is logged once with its reason.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from . import reference
from .checks import SUPPORTED_DTYPES, head_dim_problem
from .kv_cache import FP8_DTYPE, KV_WRITE_DTYPES, write_kv_cache

KERNELS = ("prefill", "decode", "kv-write", "paged-prefill")
MAX_DECODE_ROWS = 128  # query tokens x query heads per KV head in one decode tile

logger = logging.getLogger("frugalserve.kernels")
ENV = "FRUGALSERVE_ATTENTION"
VARIANT_ENV = "FRUGALSERVE_PREFILL_VARIANT"  # "pointer" (default) or "tma": the prefill kernel's K/V loads
PREFILL_VARIANTS = ("pointer", "tma")
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when `triton` imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def choose(device: torch.device | str) -> tuple[bool, str]:
    """(use_triton, reason) for tensors on `device`."""
    device = torch.device(device)
    mode = os.environ.get(ENV, "auto").lower()
    if mode == "reference":
        return False, f"{ENV}=reference"
    err = triton_import_error()
    if err is not None:
        return False, err
    if mode == "triton":
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return True, f"{ENV}=triton"
        return False, f"{ENV}=triton but device is {device.type} and TRITON_INTERPRET is not 1"
    if device.type != "cuda":
        return False, f"device is {device.type}, the Triton kernels need CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, f"CUDA device with compute capability {major}.{minor} and triton available"


@dataclass(frozen=True)
class KernelDecision:
    """What runs for one kernel: the Triton kernel (use_triton) or the PyTorch reference, and why."""

    use_triton: bool
    reason: str


def _unsupported(kernel: str, dtype: torch.dtype, head_dim: int, group: int, query_len: int,
                 kv_dtype: torch.dtype | None = None) -> str | None:
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if kv_dtype not in (dtype, FP8_DTYPE):
        return f"a {kv_dtype} KV cache with {dtype} inputs (the cache holds the inputs' dtype or {FP8_DTYPE})"
    if kernel == "kv-write":  # a copy (or an fp8 quantization): any head dim, float32 too
        return None if dtype in KV_WRITE_DTYPES else f"dtype {dtype} (the kv-write kernel takes {KV_WRITE_DTYPES})"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the {kernel} kernel takes {SUPPORTED_DTYPES})"
    problem = head_dim_problem(head_dim)
    if problem is not None:
        return problem
    if kernel == "decode" and query_len * group > MAX_DECODE_ROWS:
        return (f"{query_len} query tokens x {group} query heads per KV head > {MAX_DECODE_ROWS} "
                "rows in one decode tile")
    return None


def decide(kernel: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, num_heads: int,
           num_kv_heads: int, *, query_len: int = 1, kv_dtype: torch.dtype | None = None) -> KernelDecision:
    """Whether `kernel` ("prefill", "decode", "kv-write" or "paged-prefill") runs in Triton for this
    layout, and why: the decision every call makes (`query_len`: decode's query tokens per sequence;
    paged prefill takes any; `kv_dtype`: the K/V cache's dtype, None for `dtype`, or
    torch.float8_e4m3fn for an fp8 cache). A pure function
    of its arguments, the environment and the device, so an engine can report it at load time.
    Raises ValueError for an unknown kernel or a head layout no path can run."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (one of {KERNELS})")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    ok, reason = choose(device)
    if not ok:
        return KernelDecision(False, reason)
    bad = _unsupported(kernel, dtype, head_dim, num_heads // num_kv_heads, query_len, kv_dtype)
    if bad is not None:
        return KernelDecision(False, f"unsupported input: {bad}")
    layout = f"{str(dtype).removeprefix('torch.')}, head_dim {head_dim}, {num_heads}/{num_kv_heads} heads"
    if kv_dtype is not None and kv_dtype != dtype:
        layout += f", {str(kv_dtype).removeprefix('torch.')} KV cache"
    return KernelDecision(True, f"{reason}; {layout} supported")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, kernel: str = "prefill") -> str | None:
    """Why the kernel cannot take these tensors (the layout part of `decide`), or None."""
    if k.dtype not in (q.dtype, FP8_DTYPE):
        return f"k dtype {k.dtype} != q dtype {q.dtype}"
    query_len = q.shape[1] if kernel == "decode" else 1
    return _unsupported(kernel, q.dtype, q.shape[-1], q.shape[-2] // max(1, k.shape[-2]), query_len, k.dtype)


def use_triton_for(q: torch.Tensor, k: torch.Tensor, what: str, kernel: str = "prefill") -> bool:
    """The per-call decision for q [..., Hq, D] against k [..., Hkv, D] (q's dtype or fp8), logged
    once per message."""
    if k.dtype not in (q.dtype, FP8_DTYPE):
        ok, reason = False, f"unsupported input: k dtype {k.dtype} != q dtype {q.dtype}"
    else:
        query_len = q.shape[1] if kernel == "decode" else 1
        d = decide(kernel, q.device, q.dtype, q.shape[-1], q.shape[-2], k.shape[-2], query_len=query_len,
                   kv_dtype=k.dtype)
        ok, reason = d.use_triton, d.reason
    _log_once(f"{what}: {'triton' if ok else 'reference'} ({reason})")
    return ok


def prefill_variant(q, k, v, variant: str | None = None) -> tuple[bool, str]:
    """(use the tensor-descriptor variant, why) for a prefill launch that runs in Triton. `variant` (else
    FRUGALSERVE_PREFILL_VARIANT, else "pointer"): "pointer" is the default kernel; "tma" is opt-in, K/V read
    through tl.make_tensor_descriptor (TMA on sm90+), and falls back to the pointer kernel where
    prefill.tma_problem says it cannot run."""
    variant = (variant or os.environ.get(VARIANT_ENV, "pointer")).lower()
    if variant not in PREFILL_VARIANTS:
        raise ValueError(f"prefill variant {variant!r} is not one of {PREFILL_VARIANTS}")
    if variant == "pointer":
        return False, "pointer loads (the default variant)"
    from .prefill import tma_problem

    problem = tma_problem(q, k, v)
    if problem is not None:
        return False, f"tma requested, pointer loads instead: {problem}"
    return True, "tensor descriptors (tma)"


def _use_tma(q, k, v, variant, what: str) -> bool:
    ok, reason = prefill_variant(q, k, v, variant)
    _log_once(f"{what}: {reason}")
    return ok


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention(q, k, v, *, causal=True, alibi_slopes=None, scale=None, kv_lo=None, attn_mask=None,
              autotune=True, k_scale=None, v_scale=None, variant=None):
    """Padded-batch attention, [B, Sq, Hq, D] x [B, Sk, Hkv, D] -> [B, Sq, Hq, D]; see reference.py.
    An explicit bool `attn_mask` always takes the reference path. `autotune=False`: the kernel's
    fixed config for the head dim (see prefill.flash_attention). fp8 k/v take `k_scale`/`v_scale`.
    `variant`: the kernel's K/V loads, see prefill_variant."""
    if attn_mask is None and use_triton_for(q, k, "prefill attention"):
        from .prefill import flash_attention

        return flash_attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes, scale=scale, kv_lo=kv_lo,
                               autotune=autotune, k_scale=k_scale, v_scale=v_scale,
                               tma=_use_tma(q, k, v, variant, "prefill attention"))
    if attn_mask is not None:
        _log_once("attention with an arbitrary mask: reference (the kernels take causal/left-padding only)")
    return reference.attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes, scale=scale,
                                         kv_lo=kv_lo, attn_mask=attn_mask, compute_dtype=_compute_dtype(q),
                                         k_scale=k_scale, v_scale=v_scale)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, causal=True, alibi_slopes=None,
                     scale=None, autotune=True, k_scale=None, v_scale=None, variant=None):
    """Packed variable-length attention [Tq, Hq, D] x [Tk, Hkv, D] -> [Tq, Hq, D]. A serving engine
    passes `autotune=False`: one fixed config per head dim, no autotuning benchmark mid-serving
    (the autotune key has a length bucket: each new bucket would stall for seconds). fp8 k/v (a
    gathered fp8 cache) take `k_scale`/`v_scale`. `variant`: the kernel's K/V loads, see prefill_variant."""
    if use_triton_for(q, k, "varlen attention"):
        from .prefill import flash_attention_varlen

        return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal=causal,
                                      alibi_slopes=alibi_slopes, scale=scale, autotune=autotune,
                                      k_scale=k_scale, v_scale=v_scale,
                                      tma=_use_tma(q, k, v, variant, "varlen attention"))
    return reference.varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                alibi_slopes=alibi_slopes, scale=scale,
                                                compute_dtype=_compute_dtype(q), k_scale=k_scale,
                                                v_scale=v_scale)


def decode(q, k_cache, v_cache, block_tables, context_lens, *, alibi_slopes=None, scale=None, k_scale=None,
           v_scale=None, **kwargs):
    """Paged decode attention [B, Lq, Hq, D] -> [B, Lq, Hq, D]; see reference.paged_decode_reference.
    `kwargs` go to decode.paged_decode_attention (its docstring says which make it capture-safe);
    the reference takes `max_context_len` of them. An fp8 cache takes `k_scale`/`v_scale`."""
    if use_triton_for(q, k_cache, "paged decode attention", kernel="decode"):
        from .decode import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                      alibi_slopes=alibi_slopes, scale=scale, k_scale=k_scale,
                                      v_scale=v_scale, **kwargs)
    out = reference.paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens,
                                           alibi_slopes=alibi_slopes, scale=scale,
                                           compute_dtype=_compute_dtype(q),
                                           max_context_len=kwargs.get("max_context_len"),
                                           k_scale=k_scale, v_scale=v_scale)
    if kwargs.get("out") is not None:
        return kwargs["out"].copy_(out)
    return out


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *, max_seqlen_q, alibi_slopes=None,
                  scale=None, out=None, k_scale=None, v_scale=None):
    """Packed queries [T, Hq, D] of B sequences (rows cu_seqlens_q[b] : cu_seqlens_q[b+1], each
    sequence's last tokens) against a paged cache [num_pages, page_size, Hkv, D] through block_tables
    [B, max_pages], causal: one call for the decode rows and prefill chunks of a step. The Triton kernel
    (capture-safe, see paged_prefill.paged_prefill_attention) or the reference
    (reference.paged_prefill_reference, a host sync); neither writes rows >= cu_seqlens_q[B] of `out`."""
    if use_triton_for(q, k_cache, "paged prefill attention", kernel="paged-prefill"):
        from .paged_prefill import paged_prefill_attention

        return paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                       max_seqlen_q=max_seqlen_q, alibi_slopes=alibi_slopes, scale=scale,
                                       out=out, k_scale=k_scale, v_scale=v_scale)
    return reference.paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                             alibi_slopes=alibi_slopes, scale=scale,
                                             compute_dtype=_compute_dtype(q), out=out, k_scale=k_scale,
                                             v_scale=v_scale)


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Write key/value [T, Hkv, D] into k/v_cache [num_pages, page_size, Hkv, D] at flat slots
    `slot_mapping` [T] (< 0: skipped); an fp8 cache stores them quantized with `k_scale`/`v_scale`
    (float32 [Hkv] or [1]). The Triton kernel (no host sync, CUDA-graph capturable) or the PyTorch
    reference; see kv_cache.py."""
    if use_triton_for(key, key, "kv-cache write", kernel="kv-write"):  # cache shape/dtype: checked by both
        from .kv_cache import write_kv_cache_triton

        return write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
