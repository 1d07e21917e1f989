"""Paged prefill attention in Triton: every row of a mixed step (decodes and prefill chunks) in one launch,
straight from the paged KV cache.

The step's queries are packed, [T, Hq, D], sequence b's rows at cu_seqlens_q[b] : cu_seqlens_q[b+1]: its
last Lq_b tokens, whose K/V the KV-write kernel has already put in the cache. The grid is flat over query
tiles, T // TOK + B programs per (KV head, head chunk) (TOK query tokens per tile): sequence b's tiles
start at cu_seqlens_q[b] // TOK + b, so a program finds its sequence by a binary search over
cu_seqlens_q and exits at once when its tile lies past that sequence's Lq_b. The grid is a function of
host ints only (T, B, Hkv, the head chunks): a launch can be captured in a CUDA graph and replayed with
other cu_seqlens_q, seq_lens and block tables. Each tile is a FlashAttention-2 loop over key blocks up
to its diagonal; keys are read per token through the block table (as decode.py does), any page size.
The query heads that share a KV head are packed into one tile (row r = token r // PACK, head r % PACK).
Head dims: checks.SUPPORTED_HEAD_DIMS, padded to a power-of-two BLOCK_D and masked.
An fp8 (e4m3) cache with per-KV-head scales is dequantized in the kernel.
Unsupported: float32 inputs, non-causal attention, sliding windows, soft-capping, other quantized caches.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_heads, check_index, check_kv, check_slopes
from .kv_cache import check_scale

LOG2E = 1.4426950408889634
MAX_PACK = 16  # query heads per tile at most; larger groups are split into chunks
NARROW_ROWS = 16  # a launch whose every sequence fits max_seqlen_q x PACK <= 16 rows takes the decode tile

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per BLOCK_D class (<= 64, 128, 256): "wide" for prefill chunks
# and mixed steps, "narrow" for launches of at most 16 query rows per sequence and KV head (decode-only).
# Chosen by register spills, compiled offline for sm90 (benchmarks/kernel_resources.py, Triton 3.9, bf16,
# ALiBi, 4 query heads per KV head, page 16; benchmarks/results/kernel-resources-sm90.json). Shared
# memory is 4-48 KB for all of them (sm86/89 have 99 KB): registers are the limit; 2 and 3 stages give
# the same registers and shared memory (the per-token gathers do not appear multi-buffered). Wide: 128 rows x 64 keys with 8 warps
# spills nothing up to BLOCK_D 64 but 256 B per thread at 128, where 32 keys spill 24 B (4 warps:
# 72-1544 B); at 256, 64 rows x 16 keys spill 40 B (x 32 keys 152 B, 128 rows 392 B). Narrow: 64 keys
# spill nothing up to BLOCK_D 64, 232 B at 128, where 32 keys spill nothing (also at 256).
_SHAPES = {
    64: {"wide": (128, 64, 8, 2), "narrow": (16, 64, 4, 2)},
    128: {"wide": (128, 32, 8, 2), "narrow": (16, 32, 4, 2)},
    256: {"wide": (64, 16, 8, 2), "narrow": (16, 32, 4, 2)},
}
# The interpreter's cost grows with the tile: small tiles, several query tiles and key blocks per test.
_INTERPRETER_SHAPES = {"wide": (32, 16, 4, 1), "narrow": (16, 16, 4, 1)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pack(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(query heads per tile, head chunks per KV head) for this head layout."""
    group = num_heads // num_kv_heads
    p = min(group, MAX_PACK)
    return p, triton.cdiv(group, p)


def tile_shape(head_dim: int, heads_per_tile: int, max_seqlen_q: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the launch: fixed per head-dim class, the narrow
    (decode) tile when max_seqlen_q x heads_per_tile <= 16 rows. Host ints only: no autotuning."""
    kind = "narrow" if max_seqlen_q * heads_per_tile <= NARROW_ROWS else "wide"
    if _interpreting():
        return _INTERPRETER_SHAPES[kind]
    return _SHAPES[max(64, _block_d(head_dim))][kind]


@triton.jit
def _find_seq(CuQ, pid, num_seqs, TOK: tl.constexpr):
    """The last sequence b whose first query tile, cu_q[b] // TOK + b, is <= pid (binary search)."""
    lo = pid * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(CuQ + mid) // TOK + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return tl.maximum(lo - 1, 0)


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_ks, stride_vp, stride_vs,
                   offs_d, d_ok, q_pos, slope2, lo, hi, qk_scale,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr, USE_ALIBI: tl.constexpr):
    q_posf = q_pos.to(tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < hi
            page = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
        slot = (offs_n % PAGE).to(tl.int64)
        k_off = page * stride_kp + slot * stride_ks
        v_off = page * stride_vp + slot * stride_vs
        if MASKED:
            k = tl.load(k_head + k_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_head + k_off[None, :] + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, k.to(q.dtype)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain; fp8 -> q dtype exact
        if USE_ALIBI:
            qk += slope2[:, None] * (offs_n.to(tl.float32)[None, :] - q_posf[:, None])
        if MASKED:
            qk = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    Q, KC, VC, O, BT, CuQ, SeqLens, Slopes, KScale, VScale,  # noqa: E741
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_btb,
    num_seqs, num_chunks, max_pages, qk_scale, stride_scale,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_ALIBI: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    TOK: tl.constexpr = BLOCK_M // PACK  # query tokens per tile
    pid = tl.program_id(0)
    kvh = tl.program_id(1) // num_chunks
    chunk = tl.program_id(1) % num_chunks
    b = _find_seq(CuQ, pid, num_seqs, TOK)
    q_start = tl.load(CuQ + b)
    len_q = tl.load(CuQ + b + 1) - q_start
    local = pid - (q_start // TOK + b)
    n_mblocks = tl.cdiv(len_q, TOK)
    if (local < 0) | (local >= n_mblocks):  # past this sequence's queries (or a padded sequence)
        return
    m_blk = n_mblocks - 1 - local  # a sequence's heaviest (last) tiles are scheduled first
    v_scale = 1.0
    if KV_FP8:  # per-KV-head scales: K's folds into the logit scale, V's into the output
        qk_scale = qk_scale * tl.load(KScale + kvh * stride_scale)
        v_scale = tl.load(VScale + kvh * stride_scale)
    # keys past the block table cannot be read, whatever seq_lens says
    seq_len = tl.minimum(tl.load(SeqLens + b), max_pages * PAGE)

    rows = tl.arange(0, BLOCK_M)
    tok = m_blk * TOK + rows // PACK
    head = chunk * PACK + rows % PACK
    row_ok = (tok < len_q) & (head < GROUP) & (rows < TOK * PACK)
    qh = kvh * GROUP + head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = seq_len - len_q + tok  # key position of each query row (bottom-right alignment)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slope2 = tl.load(Slopes + qh, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    k_head = KC + kvh.to(tl.int64) * stride_kh
    v_head = VC + kvh.to(tl.int64) * stride_vh
    # keys [0, hi) are visible to some row of the tile; [0, full_hi) to every row (no mask)
    first_q = seq_len - len_q + m_blk * TOK
    hi = tl.minimum(seq_len, first_q + TOK)
    full_hi = tl.minimum(tl.maximum(first_q + 1, 0) // BLOCK_N * BLOCK_N, seq_len // BLOCK_N * BLOCK_N)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_ks,
                                   stride_vp, stride_vs, offs_d, d_ok, q_pos, slope2, 0, full_hi, qk_scale,
                                   BLOCK_N, PAGE, False, USE_ALIBI)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_ks,
                                   stride_vp, stride_vs, offs_d, d_ok, q_pos, slope2, full_hi, hi, qk_scale,
                                   BLOCK_N, PAGE, True, USE_ALIBI)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key give 0
    if KV_FP8:
        l_i = l_i / v_scale
    tl.store(O + q_rows[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_seqlen_q: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries against a paged KV cache; semantics of
    reference.paged_prefill_reference. An fp8 (float8_e4m3fn) cache is read with its float32
    scales `k_scale`/`v_scale` ([Hkv] or [1]) and dequantized in the kernel, as in
    decode.paged_decode_attention.

    q [T, Hq, D]: B sequences packed, sequence b's rows cu_seqlens_q[b] : cu_seqlens_q[b+1] (Lq_b >= 0
    rows; cu_seqlens_q [B+1] int, cu_seqlens_q[0] = 0, cu_seqlens_q[B] <= T) are its last Lq_b tokens:
    query i sits at position seq_lens[b] - Lq_b + i and sees keys 0 .. that position, read from
    k/v_cache [num_pages, page_size, Hkv, D] through block_tables[b] ([B, max_pages] int). seq_lens [B]:
    tokens in the cache, the new ones included (Lq_b <= seq_lens[b] <= max_pages * page_size; the
    kernel reads no key past the table). ALiBi adds slope[h] * (key_pos - query_pos) to the scaled
    logit. Returns [T, Hq, D] (or writes `out`); rows >= cu_seqlens_q[B] are not written (uninitialised
    when `out` is None), nor is anything of a sequence with Lq_b = 0, whose block-table row and
    seq_lens entry are not read.

    `max_seqlen_q` (host int, a bound on every Lq_b) picks the tile: the decode tile when
    max_seqlen_q x (query heads per tile) <= 16, else the chunk tile; it is never read on the device,
    and a sequence longer than it is still computed in full. The grid is (T // TOK + B, Hkv x head
    chunks), host ints only.

    CUDA-graph capture: capture-safe (no host sync, no host-to-device copy, no allocation whose size
    depends on device values) with `block_tables`, `cu_seqlens_q` and `seq_lens` int32 with a unit last
    stride (read in place, so the graph sees what is later written into them; int64 ones are converted
    on the stream, a copy per call), `alibi_slopes` None or float32 on q's device, and `out` given for a
    static output. Replays take any values in those buffers that keep the contract above."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v_cache must both be [num_pages, page_size, Hkv, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"cache head_dim {Dk} != query head_dim {D}")
    kv_fp8 = check_kv(q, k_cache, v_cache)
    check_head_dim(D)
    group = check_heads(Hq, Hkv)
    if kv_fp8:
        k_scale = check_scale("k_scale", k_scale, Hkv, q.device)
        v_scale = check_scale("v_scale", v_scale, Hkv, q.device)
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise ValueError(f"cu_seqlens_q must be [B+1] with B >= 1, got {tuple(cu_seqlens_q.shape)}")
    B = cu_seqlens_q.numel() - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_pages], got {tuple(block_tables.shape)}")
    cu_q = check_index("cu_seqlens_q", cu_seqlens_q, (B + 1,), q.device)
    lens = check_index("seq_lens", seq_lens, (B,), q.device)
    tables = check_index("block_tables", block_tables, tuple(block_tables.shape), q.device)
    slopes = check_slopes(alibi_slopes, Hq, q.device)
    max_seqlen_q = int(max_seqlen_q)
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    if out is None:
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim")
    if T == 0:
        return out
    heads_per_tile, chunks = pack(Hq, Hkv)
    block_m, block_n, warps, stages = tile_shape(D, heads_per_tile, max_seqlen_q)
    tok = block_m // heads_per_tile
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _paged_prefill_kernel[(T // tok + B, Hkv * chunks)](
        q, k_cache, v_cache, out, tables, cu_q, lens, slopes if slopes is not None else q,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:2], tables.stride(0),
        B, chunks, tables.shape[1], scale * LOG2E, 1 if k_scale is not None and k_scale.numel() > 1 else 0,
        GROUP=group, PACK=heads_per_tile, HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, USE_ALIBI=slopes is not None, KV_FP8=kv_fp8, num_warps=warps, num_stages=stages,
    )
    return out
