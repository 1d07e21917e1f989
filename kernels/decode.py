"""Paged decode attention in Triton, flash-decoding style.

One program per (sequence, KV head, context split): the Lq*G query rows that read this KV head
(Lq new tokens x G packed query heads) share every K/V tile it loads. Splits write partial
(acc, max, sum) in fp32 and a second kernel reduces them, so a small batch with a long context still
fills the GPU. The KV cache is [num_pages, page_size, Hkv, D] (vLLM's flash layout), any page size.
An fp8 (e4m3) cache with per-KV-head scales is read and dequantized in the kernel (half the bytes of bf16).
Head dims: checks.SUPPORTED_HEAD_DIMS, padded to a power-of-two BLOCK_D and masked; the key tile BLOCK_N
shrinks for 256-wide heads (decode_block_n) so K/V tiles keep the size they have at d 128.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_heads, check_index, check_kv, check_slopes
from .kv_cache import (
    check_scale,
    write_kv_cache,  # noqa: F401  (re-exported: the writer beside the reader)
)

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    Q, KC, VC, BT, Ctx, Slopes, Out, PartO, PartML, KScale, VScale,
    stride_qb, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_btb, stride_ob, stride_ot, stride_oh,
    num_kv_heads, num_heads, num_splits, tokens_per_split, qk_scale, stride_scale,
    GROUP: tl.constexpr, QLEN: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_ALIBI: tl.constexpr,
    SPLIT: tl.constexpr, KV_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    v_scale = 1.0
    if KV_FP8:  # per-KV-head scales: K's folds into the logit scale, V's into the output
        qk_scale = qk_scale * tl.load(KScale + kvh * stride_scale)
        v_scale = tl.load(VScale + kvh * stride_scale)
    ctx = tl.load(Ctx + b)
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    rows = tl.arange(0, BLOCK_R)
    t = rows // GROUP
    qh = kvh * GROUP + rows % GROUP
    row_ok = rows < QLEN * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + t[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx - QLEN + t
    q_posf = q_pos.to(tl.float32)
    slope2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if USE_ALIBI:
        slope2 = tl.load(Slopes + qh, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    bt_row = BT + b64 * stride_btb
    k_head = KC + kvh * stride_kh
    v_head = VC + kvh * stride_vh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = (offs_n % PAGE).to(tl.int64)
        k = tl.load(k_head + page[None, :] * stride_kp + slot[None, :] * stride_ks + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_head + page[:, None] * stride_vp + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k = k.to(q.dtype)  # fp8 -> fp16/bf16 is exact; a no-op for an fp16/bf16 cache
        v = v.to(q.dtype)
        qk = tl.dot(q, k) * qk_scale
        if USE_ALIBI:
            qk += slope2[:, None] * (offs_n.to(tl.float32)[None, :] - q_posf[:, None])
        qk = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if KV_FP8:
        acc = acc * v_scale

    if SPLIT:
        # partials: PartO [B, QLEN, Hq, splits, BLOCK_D], PartML [2, B, QLEN, Hq, splits]
        idx = ((b64 * QLEN + t) * num_heads + qh) * num_splits + s
        tl.store(PartO + idx[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        n_part = num_splits * num_heads * QLEN * tl.num_programs(0)
        tl.store(PartML + idx, m_i, mask=row_ok)
        tl.store(PartML + n_part + idx, l_i, mask=row_ok)
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(Out + b64 * stride_ob + t[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _reduce_kernel(PartO, PartML, Out, stride_ob, stride_ot, stride_oh, num_heads, num_splits, n_part,
                   QLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # over B * QLEN * Hq
    h = pid % num_heads
    t = (pid // num_heads) % QLEN
    b = pid // (num_heads * QLEN)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    base = pid * num_splits
    m = tl.load(PartML + base + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PartML + n_part + base + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)
    l_tot = tl.sum(w * l_s, 0)
    l_tot = tl.where(l_tot == 0.0, 1.0, l_tot)
    o = tl.load(PartO + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / l_tot
    tl.store(Out + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def decode_block_n(head_dim: int, kv_fp8: bool = False, rows: int = 16) -> int:
    """Keys per tile: 64 up to BLOCK_D 128 (measured on H200 at d 128), 32 beyond, so a K or V tile
    stays 16 KB at bf16 (BLOCK_N x BLOCK_D x 2 bytes). An fp8 cache takes twice the keys where the tile
    of `rows` query rows x BLOCK_D is at most 16 x 128, so a tile moves the bytes of a bf16 tile (the bytes in
    flight per program, which bound a bandwidth-bound loop). Compiled for sm90 (Triton 3.9, bf16 queries,
    ALiBi, 4 warps): 16 x 128 rows x dims with 128 fp8 keys spill 56 bytes per thread (the bf16 default 112),
    16 x 64 nothing; 64 x 128 with 128 keys would spill 640 (with 64: nothing), 16 x 256 with 64 keys 776 (32: 8)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    n = 64 if block_d <= 128 else 32
    return 2 * n if kv_fp8 and rows * block_d <= 16 * 128 else n


def _num_warps(block_r: int, block_d: int) -> int:
    # Compiled for sm90 (benchmarks/kernel_resources.py, Triton 3.9): with 4 warps a 128 x 128 or 64 x 256
    # tile of query rows x head dim spills 0.5-1.6 KB per thread, with 8 warps nothing; smaller tiles
    # spill <= 224 bytes with 4 (16 x 128, the default measured on H200, spills 112).
    return 4 if block_r * block_d <= 64 * 128 else 8


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int = 64,
                       num_sms: int = 132) -> int:
    """The most splits that keep the grid within one wave of ~4 programs per SM (measured on H200: B=16,
    S=16k: 4 splits 3.97 TB/s, 5 splits 3.14 TB/s from a second partial wave), and >= 4 tiles per split."""
    splits = max(1, (4 * num_sms) // max(1, batch * num_kv_heads))
    return max(1, min(splits, max_context // (4 * block_n), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Lq, Hq, D]: the last Lq tokens of each sequence, whose K/V are already in the cache;
    k/v_cache [num_pages, page_size, Hkv, D]; block_tables [B, max_pages] int32; context_lens [B]
    (cached tokens, new ones included). Returns [B, Lq, Hq, D]; semantics of
    reference.paged_decode_reference. A row with context_lens 0 (a padded row) returns zeros and
    reads neither its block-table row nor the cache.

    An fp8 (float8_e4m3fn) cache is read with its float32 scales `k_scale`/`v_scale` ([Hkv], or [1]
    for one scale per layer): K tiles are converted to q's dtype (exact) and the K scale folded into
    the logit scale, the V scale applied to the output, so a key or value counts as cache x scale.

    `max_context_len` bounds every context_lens entry (tokens past it are not read); when None it
    is `context_lens.max()`, a device-to-host sync. `num_splits` (None: from the batch shape,
    max_context_len and the SM count, all host values) and `block_n` (None: decode_block_n(D, fp8, rows)) set
    the grid, which depends on nothing else.

    CUDA-graph capture: capture-safe (no host sync, no host-to-device copy, nothing outside the
    stream) when `max_context_len` is given (an int, the bucket's bound), `block_tables` and
    `context_lens` are int32 with a unit last stride (they are read in place, not copied: the
    graph sees later writes into them), `alibi_slopes` is None or float32 on q's device, and
    `out` (optional) is given for a static output; pass `num_splits` as well so that the captured
    grid does not depend on the SM count. Replays then take any q, cache, block_tables and
    context_lens values written into the same buffers with every context_lens <= max_context_len.
    int64 index tensors are converted on the stream (capturable, but a copy per call)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Lq, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v_cache must both be [num_pages, page_size, Hkv, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    B, Lq, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"cache head_dim {Dk} != query head_dim {D}")
    kv_fp8 = check_kv(q, k_cache, v_cache)
    check_head_dim(D)
    group = check_heads(Hq, Hkv)
    if kv_fp8:
        k_scale = check_scale("k_scale", k_scale, Hkv, q.device)
        v_scale = check_scale("v_scale", v_scale, Hkv, q.device)
    if Lq < 1 or Lq * group > 128:
        raise ValueError(f"query tokens per sequence x heads per KV head = {Lq}x{group} must be in 1..128 "
                         "(use the prefill kernel for longer queries)")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_pages], got {tuple(block_tables.shape)}")
    block_tables = check_index("block_tables", block_tables, tuple(block_tables.shape), q.device)
    context_lens = check_index("context_lens", context_lens, (B,), q.device)
    slopes = check_slopes(alibi_slopes, Hq, q.device)
    if out is None:
        out = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim")
    if block_n is None:
        block_n = decode_block_n(D, kv_fp8, max(16, triton.next_power_of_2(Lq * group)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if B == 0:
        return out
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    max_context_len = int(max_context_len)
    if max_context_len > block_tables.shape[1] * page:
        raise ValueError(f"context of {max_context_len} tokens does not fit {block_tables.shape[1]} pages of {page}")
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = default_num_splits(B, Hkv, max_context_len, block_n, sms)
    per_split = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(max_context_len, 1), per_split)
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(16, triton.next_power_of_2(Lq * group))
    split = num_splits > 1
    if split:
        part_o = torch.empty(B * Lq * Hq * num_splits * block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2 * B * Lq * Hq * num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if num_warps is None:
        num_warps = _num_warps(block_r, block_d)
    if os.environ.get("TRITON_INTERPRET") == "1":
        num_stages = 1
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, slopes if slopes is not None else q, out, part_o, part_ml,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), *out.stride()[:3],
        Hkv, Hq, num_splits, per_split, scale * LOG2E, 1 if k_scale is not None and k_scale.numel() > 1 else 0,
        GROUP=group, QLEN=Lq, BLOCK_R=block_r, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page,
        USE_ALIBI=slopes is not None, SPLIT=split, KV_FP8=kv_fp8, num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _reduce_kernel[(B * Lq * Hq,)](
            part_o, part_ml, out, *out.stride()[:3], Hq, num_splits, B * Lq * Hq * num_splits,
            QLEN=Lq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        )
    return out
