"""Writing new K/V into a paged cache: a Triton kernel and its PyTorch reference (also the CPU path).

Both write key/value [T, Hkv, D] into k/v_cache [num_pages, page_size, Hkv, D] at flat slots
`slot_mapping[t] = page * page_size + offset` and skip slots < 0 (padding). The kernel reads the slots
on the device, so it never synchronises with the host and can be captured in a CUDA graph; the
reference drops padding with a boolean index (a host sync when there is padding).
`dispatch.write_kv` picks between them.

fp8 caches (torch.float8_e4m3fn): both quantize on the way in, `clamp(x / scale, -448, 448)` rounded to
nearest even, with one float32 scale per KV head (`k_scale`/`v_scale` [Hkv], or one scalar for all
heads, vLLM's per-tensor scale); the readers multiply by the same scale (see `dequantize_kv`).

This module imports without triton: the kernel is defined on its first launch.
"""

from __future__ import annotations

import functools

import torch

KV_WRITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value: quantization saturates there


def is_fp8(t: torch.Tensor | torch.dtype) -> bool:
    return (t if isinstance(t, torch.dtype) else t.dtype) == FP8_DTYPE


def check_scale(name: str, scale: torch.Tensor | None, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """A float32 [Hkv] (or [1]: one scale for every head) contiguous scale on `device`; ValueError
    otherwise. An fp8 cache without its scale is an error: the bytes mean nothing without it."""
    if scale is None:
        raise ValueError(f"an fp8 KV cache needs {name} (float32 [num_kv_heads={num_kv_heads}] or [1])")
    if scale.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {scale.dtype}")
    if scale.numel() not in (1, num_kv_heads) or scale.dim() > 1:
        raise ValueError(f"{name} must be [num_kv_heads={num_kv_heads}] or [1], got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, expected {device}")
    return scale.reshape(-1).contiguous()


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, D] / scale ([Hkv] or [1]), saturated to +-448, as float8_e4m3fn (the reference of
    the KV-write kernel's quantization, bit for bit)."""
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 cache slice [..., Hkv, D] times its per-head scale, in `dtype`; any other cache as it is
    (converted to `dtype`)."""
    if not is_fp8(cache):
        return cache.to(dtype)
    if scale is None:
        raise ValueError("an fp8 KV cache needs its scale to be read")
    s = scale.to(device=cache.device, dtype=dtype)
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
    return cache.to(dtype) * s


def _check(key, value, k_cache, v_cache, slot_mapping) -> None:
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key/value must both be [T, Hkv, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError("k_cache/v_cache must both be [num_pages, page_size, Hkv, D]")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != key heads/dim {tuple(key.shape[1:])}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: k_cache {k_cache.dtype} vs v_cache {v_cache.dtype}")
    if key.dtype != value.dtype or (key.dtype != k_cache.dtype and not is_fp8(k_cache)):
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
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Reference: write key/value [T, Hkv, D] into k/v_cache [num_pages, page_size, Hkv, D] at flat
    slots `slot_mapping[t] = page * page_size + offset` (int32/int64 [T]); a slot < 0 is skipped
    (padding), a slot >= num_pages * page_size is an error. Syncs with the host when `slot_mapping`
    is on a GPU. An fp8 cache stores `quantize_fp8(key, k_scale)` (likewise V); the scales are
    ignored for other caches."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    if is_fp8(k_cache):
        hkv = k_cache.shape[2]
        key = quantize_fp8(key, check_scale("k_scale", k_scale, hkv, key.device)).view(torch.uint8)
        value = quantize_fp8(value, check_scale("v_scale", v_scale, hkv, key.device)).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)  # no fp8 index_copy_ on CPU
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The Triton kernel for write_kv_cache's contract: key/value may have any strides with a
    contiguous last dim, dtypes KV_WRITE_DTYPES, any head dim. Slots < 0 and slots past the cache
    are skipped on the device (the kernel cannot raise). No host sync, no allocation: capture-safe
    in a CUDA graph, whose replays write the slots then in `slot_mapping` (and read the scales then
    in `k_scale`/`v_scale`). An fp8 cache is written quantized, as write_kv_cache does, bit for bit."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    fp8 = is_fp8(k_cache)
    if fp8:
        k_scale = check_scale("k_scale", k_scale, k_cache.shape[2], key.device)
        v_scale = check_scale("v_scale", v_scale, k_cache.shape[2], key.device)
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
        key, value, k_cache, v_cache, slot_mapping, k_scale if fp8 else key, v_scale if fp8 else key,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), slot_mapping.stride(0), Hkv, num_pages * page,
        1 if fp8 and k_scale.numel() > 1 else 0,
        PAGE=page, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8, FP8_MAX=FP8_MAX, num_warps=4,
    )


@functools.lru_cache(maxsize=1)
def _kernel():
    """The @triton.jit body (defined here on first use, so that the module imports without triton)."""
    global triton, tl, _round_e4m3  # the JIT resolves names in the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _round_e4m3(x, FP8_MAX: tl.constexpr):
        """fp32 x saturated to +-FP8_MAX and rounded (nearest, ties to even) onto e4m3fn's grid, in fp32,
        so the conversion that follows is exact. What the hardware conversion does on sm89+; done here
        because Triton's interpreter drops the carry when rounding up crosses into the next binade."""
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        bits = x.to(tl.int32, bitcast=True)
        # normal range: keep 3 of fp32's 23 mantissa bits; the carry of a round-up reaches the exponent
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # below 2^-6 e4m3fn is subnormal, multiples of 2^-9: fp32's own rounding at 1.5 * 2^14 (ulp 2^-9),
        # on |x|, then x's sign bit put back with integer ops, so a negative value that rounds to zero
        # stays -0 (as the conversion gives: 0x80, not 0x00). A float negation would not do: the GPU
        # compiler may drop the sign of a zero (it wrote 0x00 there on the H200).
        magic = 24576.0
        a = tl.abs(x)
        sub = (a + magic) - magic
        sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
        return tl.where(a < 0.015625, sub, normal)

    @triton.jit
    def _write_kv_kernel(
        K, V, KC, VC, Slots, KScale, VScale,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cp, stride_cs, stride_ch, stride_s,
        num_kv_heads, num_slots, stride_scale,
        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        FP8: tl.constexpr, FP8_MAX: tl.constexpr,
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
        if FP8:  # x / scale in fp32, saturated (e4m3fn has no infinity), rounded to nearest even
            h_ok = heads < num_kv_heads
            ks = tl.load(KScale + heads * stride_scale, mask=h_ok, other=1.0)
            vs = tl.load(VScale + heads * stride_scale, mask=h_ok, other=1.0)
            k = _round_e4m3(tl.math.div_rn(k.to(tl.float32), ks[:, None]), FP8_MAX).to(KC.dtype.element_ty)
            v = _round_e4m3(tl.math.div_rn(v.to(tl.float32), vs[:, None]), FP8_MAX).to(VC.dtype.element_ty)
        dst = ((slot // PAGE) * stride_cp + (slot % PAGE) * stride_cs)[:, None] + heads[:, None] * stride_ch \
            + offs_d[None, :]
        tl.store(KC + dst, k, mask=mask)
        tl.store(VC + dst, v, mask=mask)

    return _write_kv_kernel
