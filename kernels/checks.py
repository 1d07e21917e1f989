"""Input checks shared by the launchers: each failure raises ValueError naming what is unsupported."""

from __future__ import annotations

import torch

# Every multiple of 8 up to 256: the kernels tile the head dim with a power-of-two BLOCK_D (>= 16,
# tl.dot's smallest K) and mask the rest; a multiple of 8 keeps each fp16/bf16 row 16-byte aligned.
SUPPORTED_HEAD_DIMS = tuple(range(8, 257, 8))
HEAD_DIMS_TEXT = "multiples of 8 from 8 to 256"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def head_dim_problem(d: int) -> str | None:
    """None when the attention kernels take head_dim `d`, else why not."""
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {d} is not supported (supported: {HEAD_DIMS_TEXT})"
    return None


def check_head_dim(d: int) -> None:
    problem = head_dim_problem(d)
    if problem is not None:
        raise ValueError(problem)


def check_heads(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    return num_heads // num_kv_heads


def check_same(tensors: dict[str, torch.Tensor], dtypes=SUPPORTED_DTYPES) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    if first.dtype not in dtypes:
        raise ValueError(f"{names[0]} dtype {first.dtype} is not supported (supported: {dtypes})")
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise ValueError(f"dtype mismatch: {names[0]} is {first.dtype} but {name} is {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"device mismatch: {names[0]} on {first.device} but {name} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, stride {t.stride(-1)}")


def check_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k_cache",
             v_name: str = "v_cache") -> bool:
    """check_same for attention over a cache that holds q's dtype or fp8 (float8_e4m3fn); True for fp8."""
    fp8 = k.dtype == torch.float8_e4m3fn
    if not fp8:
        check_same({"q": q, k_name: k, v_name: v})
        return False
    check_same({"q": q})
    if v.dtype != k.dtype:
        raise ValueError(f"dtype mismatch: {k_name} is {k.dtype} but {v_name} is {v.dtype}")
    for name, t in ((k_name, k), (v_name, v)):
        if t.device != q.device:
            raise ValueError(f"device mismatch: q on {q.device} but {name} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, stride {t.stride(-1)}")
    return True


def check_slopes(slopes: torch.Tensor | None, num_heads: int, device: torch.device) -> torch.Tensor | None:
    if slopes is None:
        return None
    if slopes.shape != (num_heads,):
        raise ValueError(f"alibi_slopes must be [num_heads={num_heads}], got {tuple(slopes.shape)}")
    return slopes.to(device=device, dtype=torch.float32).contiguous()


def check_index(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    """`t` itself when it is int32 with a unit last stride (no copy, so CUDA-graph buffers stay the
    ones the kernel reads); an int32 contiguous copy otherwise."""
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.dtype == torch.int32 and (t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1):
        return t
    return t.to(torch.int32).contiguous()
