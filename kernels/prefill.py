"""Flash-attention forward (prefill) in Triton: causal or not, ALiBi, GQA/MQA, varlen or padded.

The query heads that share a KV head are packed into one tile (row r = token r // PACK, head r % PACK)
so each K/V tile is loaded once for all of them. Causal tiles skip key blocks above the diagonal and
apply masks only on the blocks that need them (diagonal, ragged tail, left padding).
Head dims: checks.SUPPORTED_HEAD_DIMS (multiples of 8 up to 256), padded to a power-of-two BLOCK_D and
masked; tile shapes are chosen per BLOCK_D class so a 256-wide head stays within shared memory.
K/V may be fp8 (e4m3) with per-KV-head scales, dequantized in the kernel (a gathered fp8 paged cache).
Unsupported: other head dims, float32 inputs, dropout, backward,
sliding windows, soft-capping, arbitrary masks (use the reference).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .checks import check_head_dim, check_heads, check_index, check_kv, check_slopes
from .kv_cache import check_scale

LOG2E = 1.4426950408889634
MAX_PACK = 16  # query heads per tile at most; larger groups are split into chunks


# (BLOCK_M, BLOCK_N, num_warps, num_stages), one list per BLOCK_D class. A 256-wide head doubles the
# Q/K/V tiles and the fp32 accumulator (BLOCK_M * BLOCK_D / (32 * num_warps) floats per thread).
# Compiled offline for sm90 (benchmarks/kernel_resources.py; Triton 3.9, causal + ALiBi, bf16), every
# shape needs 32-96 KB of shared memory (sm90 has 227 KB, sm80 163 KB): registers are the limit. The
# BLOCK_D 256 list keeps the shapes spilling <= 352 bytes per thread (the fixed one 104); (64, 64, *, *)
# spills 640-1240 there. The d <= 128 list is the one measured on H200 (spills 24-3272 bytes at d 128;
# the autotuner picks).
_TUNE_SHAPES = {
    128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
          (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3), (256, 128, 8, 2),
          (128, 128, 4, 3)],
    256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2), (64, 32, 8, 3), (128, 16, 8, 2), (128, 32, 8, 2),
          (64, 32, 4, 2)],
}
# The fixed-config launch (autotune=False): the first shape of the class; the next one only where the
# device reports too little shared memory for it (OutOfResources, raised before anything runs).
_FIXED_SHAPES = {
    128: [(128, 64, 8, 3), (64, 64, 4, 2)],
    256: [(64, 32, 8, 2), (32, 32, 4, 1)],
}
_INTERPRETER_SHAPE = (32, 16, 4, 1)  # small tiles: the interpreter's cost grows with the tile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _d_class(block_d: int) -> int:
    return 128 if block_d <= 128 else 256


def _config(shape) -> triton.Config:
    m, n, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _shape(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs():
    if _interpreting():
        return [_config(_INTERPRETER_SHAPE)]
    shapes = dict.fromkeys(s for group in _TUNE_SHAPES.values() for s in group)  # ordered, no repeats
    return [_config(s) for s in shapes]


def _prune(configs, named_args, **kwargs):
    """Keep the autotune shapes of this launch's BLOCK_D class (all of them where a Triton version does
    not hand the launch's keyword arguments to the pruner: the autotuner skips shapes that fail)."""
    block_d = {**named_args, **kwargs}.get("BLOCK_D")
    if _interpreting() or block_d is None:
        return configs
    keep = set(_TUNE_SHAPES[_d_class(block_d)])
    return [c for c in configs if _shape(c) in keep]


def fixed_shapes(head_dim: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the fixed-config launch tries for `head_dim`, in order."""
    if _interpreting():
        return [_INTERPRETER_SHAPE]
    return list(_FIXED_SHAPES[_d_class(_block_d(head_dim))])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _attn_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, d_ok, q_pos, slope2,
                 lo, hi, len_k, kv_lo, qk_scale, k_desc, v_desc, kvh,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 USE_ALIBI: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr):
    q_posf = q_pos.to(tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        if MASKED:
            k_ok = (offs_n < len_k) & (offs_n >= kv_lo)
        if TMA:  # a [BLOCK_N, 1, BLOCK_D] box of [len_k, Hkv, D]: rows past len_k, columns past D read as 0
            k = tl.trans(k_desc.load([start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D))
        elif MASKED:
            k = tl.load(k_base + offs_n64[None, :] * stride_kt + offs_d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_n64[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, k.to(q.dtype)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain; fp8 -> q dtype exact
        if USE_ALIBI:
            qk += slope2[:, None] * (offs_n.to(tl.float32)[None, :] - q_posf[:, None])
        if MASKED:
            ok = k_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = v_desc.load([start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D).to(q.dtype)
            if MASKED:  # left-padding rows are real memory: no 0 x garbage
                v = tl.where(k_ok[:, None], v, 0.0).to(q.dtype)
        elif MASKED:
            v = tl.load(v_base + offs_n64[:, None] * stride_vt + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + offs_n64[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=["seq_bucket", "HEAD_DIM", "PACK", "CAUSAL", "USE_ALIBI", "VARLEN", "KV_FP8",
                                         "TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _prefill_kernel(
    Q, K, V, O, Slopes, CuQ, CuK, KvLo, KScale, VScale,  # noqa: E741
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    seqlen_q, seqlen_k, num_kv_heads, num_chunks, qk_scale, seq_bucket, stride_scale,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KV_LO: tl.constexpr, KV_FP8: tl.constexpr, TMA: tl.constexpr,
):
    TOK: tl.constexpr = BLOCK_M // PACK  # query tokens per tile
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (num_kv_heads * num_chunks)
    kvh = (pid_bh // num_chunks) % num_kv_heads
    chunk = pid_bh % num_chunks
    if VARLEN:
        q_start = tl.load(CuQ + b)
        len_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        len_k = tl.load(CuK + b + 1) - k_start
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
    n_mblocks = tl.cdiv(len_q, TOK)
    if pid_m >= n_mblocks:
        return
    m_blk = n_mblocks - 1 - pid_m  # heaviest (last) causal tiles are scheduled first
    v_scale = 1.0
    if KV_FP8:  # per-KV-head scales: K's folds into the logit scale, V's into the output
        qk_scale = qk_scale * tl.load(KScale + kvh * stride_scale)
        v_scale = tl.load(VScale + kvh * stride_scale)
    kv_lo = 0
    if HAS_KV_LO:
        kv_lo = tl.load(KvLo + b)

    rows = tl.arange(0, BLOCK_M)
    tok = m_blk * TOK + rows // PACK
    head = chunk * PACK + rows % PACK
    row_ok = (tok < len_q) & (head < GROUP) & (rows < TOK * PACK)
    qh = kvh * GROUP + head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + q_rows[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tok + (len_k - len_q)  # key position of each query row (bottom-right alignment)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slope2 = tl.load(Slopes + qh, mask=row_ok, other=0.0) * 1.4426950408889634

    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    k_desc = k_base
    v_desc = v_base
    if TMA:  # tensor descriptors (TMA on sm90+) over this sequence's [len_k, Hkv, D] keys and values
        k_desc = tl.make_tensor_descriptor(K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt,
                                           shape=[len_k, num_kv_heads, HEAD_DIM], strides=[stride_kt, stride_kh, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt,
                                           shape=[len_k, num_kv_heads, HEAD_DIM], strides=[stride_vt, stride_vh, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_D])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # key range this tile can see: [kv_lo, hi); [full_lo, full_hi) needs no mask
    first_q = m_blk * TOK + (len_k - len_q)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, first_q + TOK)
        full_hi = tl.maximum(first_q + 1, 0) // BLOCK_N * BLOCK_N
    else:
        full_hi = len_k // BLOCK_N * BLOCK_N
    lo_blk = kv_lo // BLOCK_N * BLOCK_N
    full_lo = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(full_hi, len_k // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    # 1) partial first block (left padding), 2) unmasked blocks, 3) diagonal and tail blocks
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, d_ok, q_pos,
                                 slope2, lo_blk, tl.minimum(full_lo, hi), len_k, kv_lo, qk_scale, k_desc, v_desc, kvh,
                                 BLOCK_N, True, CAUSAL, USE_ALIBI, TMA, BLOCK_D)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, d_ok, q_pos,
                                 slope2, full_lo, full_hi, len_k, kv_lo, qk_scale, k_desc, v_desc, kvh,
                                 BLOCK_N, False, CAUSAL, USE_ALIBI, TMA, BLOCK_D)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, d_ok, q_pos,
                                 slope2, full_hi, hi, len_k, kv_lo, qk_scale, k_desc, v_desc, kvh,
                                 BLOCK_N, True, CAUSAL, USE_ALIBI, TMA, BLOCK_D)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    if KV_FP8:
        l_i = l_i / v_scale
    out = acc / l_i[:, None]
    tl.store(O + b64 * stride_ob + q_rows[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _pack(group: int) -> tuple[int, int]:
    pack = min(group, MAX_PACK)
    return pack, triton.cdiv(group, pack)


def _launch(q, k, v, out, strides_q, strides_k, strides_v, strides_o, batch, seqlen_q, seqlen_k, max_q,
            causal, slopes, scale, cu_q, cu_k, kv_lo, varlen, autotune, k_scale=None, v_scale=None, tma=False):
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k.shape[-2]
    group = num_heads // num_kv_heads
    pack, chunks = _pack(group)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"] // pack), batch * num_kv_heads * chunks)  # noqa: E731
    autotune = autotune and os.environ.get("FRUGALSERVE_AUTOTUNE", "1") != "0"
    args = (
        q, k, v, out, slopes if slopes is not None else q, cu_q if cu_q is not None else dummy,
        cu_k if cu_k is not None else dummy, kv_lo if kv_lo is not None else dummy,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
        *strides_q, *strides_k, *strides_v, *strides_o,
        seqlen_q, seqlen_k, num_kv_heads, chunks, scale * LOG2E,
        # the autotune key's length bucket; constant for the fixed config (no recompile per bucket)
        triton.next_power_of_2(max(max_q, 1)) if autotune else 0,
        1 if k_scale is not None and k_scale.numel() > 1 else 0,
    )
    meta = dict(GROUP=group, PACK=pack, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=causal,
                USE_ALIBI=slopes is not None, VARLEN=varlen, HAS_KV_LO=kv_lo is not None,
                KV_FP8=k_scale is not None, TMA=bool(tma))
    if tma:
        _set_allocator()
    if autotune:
        _prefill_kernel[grid](*args, **meta)
    else:
        _launch_fixed(grid, args, meta, q.device)
    return out


_fixed_resolved: dict[tuple[str, int], tuple[int, int, int, int]] = {}  # (device, head_dim) -> shape


def _launch_fixed(grid, args, meta, device) -> None:
    """Launch the autotuner's JIT function with the head dim's fixed shape: no benchmark runs."""
    key = (str(device), meta["HEAD_DIM"])
    shapes = [_fixed_resolved[key]] if key in _fixed_resolved else fixed_shapes(meta["HEAD_DIM"])
    for i, (m, n, w, st) in enumerate(shapes):
        try:
            _prefill_kernel.fn[grid](*args, **meta, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
        except OutOfResources:  # raised before the launch: nothing was written
            if i + 1 == len(shapes):
                raise
            continue
        _fixed_resolved[key] = (m, n, w, st)
        return


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    kv_lo: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    autotune: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """Padded batch: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (any strides, last dim contiguous), Sq <= Sk.
    `tma=True`: the Hopper variant, K/V read through tensor descriptors (TMA), same semantics; ValueError
    with tma_problem's reason where it cannot run.
    k/v may be fp8 (float8_e4m3fn) with float32 scales `k_scale`/`v_scale` ([Hkv] or [1]): a key
    counts as k x k_scale, dequantized in the kernel.
    Query i sits at key position i + Sk - Sq. `kv_lo` [B] int: keys before it are padding.
    Returns [B, Sq, Hq, D] (or writes `out`). See reference.attention_reference for the semantics.

    `autotune=True` benchmarks the tile shapes once per (length bucket, head dim, layout, flags);
    `autotune=False` launches the fixed shape of `fixed_shapes(head_dim)` (for serving: no benchmark
    stalls when a new length bucket appears). `FRUGALSERVE_AUTOTUNE=0` makes every launch fixed."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be 4-D [B, S, H, D], got {q.dim()}/{k.dim()}/{v.dim()} dims")
    B, Sq, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    k_scale, v_scale = _kv_scales(q, k, v, k_scale, v_scale)
    check_head_dim(D)
    check_heads(Hq, k.shape[2])
    Sk = k.shape[1]
    if Sq > Sk:
        raise ValueError(f"query length {Sq} > key length {Sk} is not supported")
    slopes = check_slopes(alibi_slopes, Hq, q.device)
    if kv_lo is not None:
        kv_lo = check_index("kv_lo", kv_lo, (B,), q.device)
    if out is None:
        out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or Sq == 0:
        return out
    if tma and (problem := tma_problem(q, k, v)) is not None:
        raise ValueError(f"the TMA prefill variant cannot run: {problem}")
    return _launch(q, k, v, out, q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3], B, Sq, Sk, Sq,
                   causal, slopes, scale, None, None, kv_lo, varlen=False, autotune=autotune,
                   k_scale=k_scale, v_scale=v_scale, tma=tma)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    *,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    autotune: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """Packed sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_* [B+1] int32 (starts, then total).
    Each sequence's queries are its last Lq tokens (Lq <= Lk). Returns [Tq, Hq, D].
    `autotune`, fp8 k/v with `k_scale`/`v_scale`, `tma`: as in flash_attention."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen q/k/v must be 3-D [T, H, D], got {q.dim()}/{k.dim()}/{v.dim()} dims")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    k_scale, v_scale = _kv_scales(q, k, v, k_scale, v_scale)
    check_head_dim(q.shape[2])
    check_heads(q.shape[1], k.shape[1])
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 2:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be 1-D [B+1] tensors of the same length")
    B = cu_seqlens_q.numel() - 1
    cu_q = check_index("cu_seqlens_q", cu_seqlens_q, (B + 1,), q.device)
    cu_k = check_index("cu_seqlens_k", cu_seqlens_k, (B + 1,), q.device)
    slopes = check_slopes(alibi_slopes, q.shape[1], q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return out
    if tma and (problem := tma_problem(q, k, v)) is not None:
        raise ValueError(f"the TMA prefill variant cannot run: {problem}")
    sq, sk, so = q.stride(), k.stride(), out.stride()
    return _launch(q, k, v, out, (0, sq[0], sq[1]), (0, sk[0], sk[1]), (0, v.stride(0), v.stride(1)),
                   (0, so[0], so[1]), B, 0, 0, int(max_seqlen_q), causal, slopes, scale, cu_q, cu_k, None,
                   varlen=True, autotune=autotune, k_scale=k_scale, v_scale=v_scale, tma=tma)


def tma_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the tensor-descriptor (TMA) variant can run on these tensors, else why not: it needs
    tl.make_tensor_descriptor, compute capability 9.0+ (or the interpreter), and K/V whose strides and base
    are multiples of 16 bytes (TMA's rule; D x element size for the head stride)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if q.is_cuda and not _interpreting() and torch.cuda.get_device_capability(q.device)[0] < 9:
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"tensor descriptors (TMA) need compute capability 9.0+, not {major}.{minor}"
    for name, t in (("k", k), ("v", v)):
        elt = t.element_size()
        if t.data_ptr() % 16 or any(st * elt % 16 for st in t.stride()[:-1]):
            return f"{name} strides {tuple(t.stride())} x {elt} bytes are not all multiples of 16 bytes"
    return None


_allocator_set = False


def _set_allocator() -> None:
    """In-kernel tensor descriptors need a scratch allocator on the GPU (triton.set_allocator)."""
    global _allocator_set
    if _allocator_set or _interpreting():
        return
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _allocator_set = True


def _kv_scales(q, k, v, k_scale, v_scale):
    """Checked (k_scale, v_scale) for fp8 k/v, (None, None) for k/v in q's dtype."""
    if not check_kv(q, k, v, "k", "v"):
        return None, None
    return check_scale("k_scale", k_scale, k.shape[-2], q.device), check_scale("v_scale", v_scale, k.shape[-2], q.device)
