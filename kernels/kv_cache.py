"""Writing new K/V into a paged cache: a Triton kernel and its PyTorch reference (also the CPU path).

Both write key/value [T, Hkv, D] into k/v_cache [num_pages, page_size, Hkv, D] at flat slots
`slot_mapping[t] = page * page_size + offset` and skip slots < 0 (padding). The kernel reads the slots
on the device, so it never synchronises with the host and can be captured in a CUDA graph; the
reference drops padding with a boolean index (a host sync when there is padding).
`dispatch.write_kv` picks between them.

This module imports without triton: the kernel is defined on its first launch.
"""

from __future__ import annotations

import functools

import torch

KV_WRITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(key, value, k_cache, v_cache, slot_mapping) -> None:
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key/value must both be [T, Hkv, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError("k_cache/v_cache must both be [num_pages, page_size, Hkv, D]")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != key heads/dim {tuple(key.shape[1:])}")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: key {key.dtype} vs cache {k_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache must be contiguous")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [T={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"device mismatch: key on {key.device} but {name} on {t.device}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: write key/value [T, Hkv, D] into k/v_cache [num_pages, page_size, Hkv, D] at flat
    slots `slot_mapping[t] = page * page_size + offset` (int32/int64 [T]); a slot < 0 is skipped
    (padding), a slot >= num_pages * page_size is an error. Syncs with the host when `slot_mapping`
    is on a GPU."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The Triton kernel for write_kv_cache's contract: key/value may have any strides with a
    contiguous last dim, dtypes KV_WRITE_DTYPES, any head dim. Slots < 0 and slots past the cache
    are skipped on the device (the kernel cannot raise). No host sync, no allocation: capture-safe
    in a CUDA graph, whose replays write the slots then in `slot_mapping`."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    if key.dtype not in KV_WRITE_DTYPES:
        raise ValueError(f"key dtype {key.dtype} is not supported (supported: {KV_WRITE_DTYPES})")
    for name, t in (("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, stride {t.stride(-1)}")
    T, Hkv, D = key.shape
    num_pages, page = k_cache.shape[:2]
    if T == 0:
        return
    import triton

    block_d = triton.next_power_of_2(D)
    block_h = max(1, min(triton.next_power_of_2(Hkv), 4096 // block_d))  # <= 4096 elements per program
    _kernel()[(T, triton.cdiv(Hkv, block_h))](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), slot_mapping.stride(0), Hkv, num_pages * page,
        PAGE=page, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


@functools.lru_cache(maxsize=1)
def _kernel():
    """The @triton.jit body (defined here on first use, so that the module imports without triton)."""
    global triton, tl  # the JIT resolves names in the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _write_kv_kernel(
        K, V, KC, VC, Slots,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cp, stride_cs, stride_ch, stride_s,
        num_kv_heads, num_slots,
        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        # token t's slot, once per head row (a [BLOCK_H] vector: the interpreter cannot broadcast a
        # scalar bool into a mask)
        slot = tl.load(Slots + t * stride_s + tl.zeros([BLOCK_H], dtype=tl.int32)).to(tl.int64)
        ok = (slot >= 0) & (slot < num_slots) & (heads < num_kv_heads)
        mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
        dst = ((slot // PAGE) * stride_cp + (slot % PAGE) * stride_cs)[:, None] + heads[:, None] * stride_ch \
            + offs_d[None, :]
        tl.store(KC + dst, k, mask=mask)
        tl.store(VC + dst, v, mask=mask)

    return _write_kv_kernel
