"""The one place that decides between the Triton kernels and the PyTorch reference.

Rule: Triton on CUDA devices of compute capability >= 8.0 when `triton` imports; the reference
everywhere else (CPU, no Triton, older GPUs) and for inputs the kernels do not support (float32,
other head dims, arbitrary masks). `FRUGALSERVE_ATTENTION=reference` forces the reference;
`FRUGALSERVE_ATTENTION=triton` forces the kernels (with `TRITON_INTERPRET=1` that runs them on CPU).
Each decision is logged once with its reason.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import reference
from .checks import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

logger = logging.getLogger("frugalserve.kernels")
ENV = "FRUGALSERVE_ATTENTION"
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


def unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (kernels take {SUPPORTED_DTYPES})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (kernels take {SUPPORTED_HEAD_DIMS})"
    if k.dtype != q.dtype:
        return f"k dtype {k.dtype} != q dtype {q.dtype}"
    return None


def use_triton_for(q: torch.Tensor, k: torch.Tensor, what: str) -> bool:
    ok, reason = choose(q.device)
    if ok:
        bad = unsupported_reason(q, k)
        if bad is not None:
            ok, reason = False, f"unsupported input: {bad}"
    _log_once(f"{what}: {'triton' if ok else 'reference'} ({reason})")
    return ok


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention(q, k, v, *, causal=True, alibi_slopes=None, scale=None, kv_lo=None, attn_mask=None):
    """Padded-batch attention, [B, Sq, Hq, D] x [B, Sk, Hkv, D] -> [B, Sq, Hq, D]; see reference.py.
    An explicit bool `attn_mask` always takes the reference path."""
    if attn_mask is None and use_triton_for(q, k, "prefill attention"):
        from .prefill import flash_attention

        return flash_attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes, scale=scale, kv_lo=kv_lo)
    if attn_mask is not None:
        _log_once("attention with an arbitrary mask: reference (the kernels take causal/left-padding only)")
    return reference.attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes, scale=scale,
                                         kv_lo=kv_lo, attn_mask=attn_mask, compute_dtype=_compute_dtype(q))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, causal=True, alibi_slopes=None,
                     scale=None, autotune=True):
    """Packed variable-length attention [Tq, Hq, D] x [Tk, Hkv, D] -> [Tq, Hq, D]."""
    if use_triton_for(q, k, "varlen attention"):
        from .prefill import flash_attention_varlen

        return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal=causal,
                                      alibi_slopes=alibi_slopes, scale=scale)
    return reference.varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                alibi_slopes=alibi_slopes, scale=scale,
                                                compute_dtype=_compute_dtype(q))


def decode(q, k_cache, v_cache, block_tables, context_lens, *, alibi_slopes=None, scale=None, **kwargs):
    """Paged decode attention [B, Lq, Hq, D] -> [B, Lq, Hq, D]; see reference.paged_decode_reference."""
    if use_triton_for(q, k_cache, "paged decode attention"):
        from .decode import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                      alibi_slopes=alibi_slopes, scale=scale, **kwargs)
    return reference.paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens,
                                            alibi_slopes=alibi_slopes, scale=scale,
                                            compute_dtype=_compute_dtype(q))


# -- provisional: replaced by the kernels branch (plan / write_kv / fixed-config prefill) --------
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class Decision:
    use_triton: bool
    reason: str


def plan(kernel, device, dtype, head_dim, num_heads, num_kv_heads) -> Decision:
    ok, reason = choose(device)
    if ok and dtype not in SUPPORTED_DTYPES:
        ok, reason = False, f"dtype {dtype}"
    if ok and head_dim not in SUPPORTED_HEAD_DIMS:
        ok, reason = False, f"head_dim {head_dim}"
    return Decision(ok, reason)


def write_kv(key, value, k_cache, v_cache, slot_mapping):
    from .kv_cache import write_kv_cache

    write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
