"""PyTorch references for the attention kernels; also the CPU path.

Conventions shared with the kernels:
- padded layout: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; varlen layout: q [Tq, Hq, D], k/v [Tk, Hkv, D]
  with `cu_seqlens` ([B+1], int32) giving each sequence's start.
- query i of a sequence with Lq queries and Lk keys sits at key position `i + Lk - Lq` (queries are the
  last Lq tokens; the causal mask is aligned bottom-right, as in a decode step against a cache).
- ALiBi adds `slope[h] * (key_pos - query_pos)` to the scaled logit (Bloom/Falcon convention up to a
  per-row constant, which softmax ignores). Falcon scales its bias by 1/sqrt(d): pass slopes/sqrt(d).
- `kv_lo[b]` keys before that index are padding (left padding) and are masked.
- GQA: query head h reads KV head h // (Hq // Hkv) (repeat_interleave).
- rows with no visible key return 0.
- fp8 (float8_e4m3fn) K/V come with float32 scales `k_scale`/`v_scale` ([Hkv] or [1]): a key is
  `k.float() * k_scale[head]` (kv_cache.dequantize_kv), in the compute dtype.
"""

from __future__ import annotations

import math

import torch

from .kv_cache import dequantize_kv


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    # [B, S, Hkv, D] -> [B, S, Hkv*group, D], head h reads KV head h // group
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    kv_lo: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padded-batch attention. `attn_mask` (optional) is a bool [B|1, 1|Hq, Sq, Sk] (True = attend)
    combined with `causal`/`kv_lo`. Returns [B, Sq, Hq, D] in q's dtype."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.to(compute_dtype).transpose(1, 2)  # [B, Hq, Sq, D]
    kf = _expand_kv(dequantize_kv(k, k_scale, compute_dtype), group).transpose(1, 2)
    vf = _expand_kv(dequantize_kv(v, v_scale, compute_dtype), group).transpose(1, 2)
    logits = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    q_pos = torch.arange(Sq, device=q.device) + (Sk - Sq)
    k_pos = torch.arange(Sk, device=q.device)
    if alibi_slopes is not None:
        rel = (k_pos[None, :] - q_pos[:, None]).to(compute_dtype)  # [Sq, Sk]
        logits = logits + alibi_slopes.to(compute_dtype).view(1, Hq, 1, 1) * rel
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = k_pos[None, :] <= q_pos[:, None]
    allowed = allowed.view(1, 1, Sq, Sk)
    if kv_lo is not None:
        allowed = allowed & (k_pos.view(1, 1, 1, Sk) >= kv_lo.view(B, 1, 1, 1).to(q.device))
    if attn_mask is not None:
        allowed = allowed & attn_mask.to(torch.bool)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    out = probs @ vf  # [B, Hq, Sq, D]
    return out.transpose(1, 2).to(q.dtype)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed variable-length attention: q [Tq, Hq, D], k/v [Tk, Hkv, D]. Returns [Tq, Hq, D]."""
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        out[qs:qe] = attention_reference(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal,
            alibi_slopes=alibi_slopes, scale=scale, compute_dtype=compute_dtype,
            k_scale=k_scale, v_scale=v_scale,
        )[0]
    return out


def gather_paged_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous [length, Hkv, D] view of one sequence's tokens from a paged cache [P, page, Hkv, D]."""
    page = cache.shape[1]
    n_pages = (length + page - 1) // page
    return cache[block_table[:n_pages].long()].flatten(0, 1)[:length]


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode against a paged cache: q [B, Lq, Hq, D] are the last Lq tokens of each sequence (their K/V
    already written); k/v_cache [num_pages, page_size, Hkv, D]; block_tables [B, max_pages];
    context_lens [B] (tokens in the cache, new ones included). Causal among the Lq queries; a row
    whose query sees no key (context_lens 0) returns 0.

    One batched computation: every sequence's K/V gathered through its block table, padded to the
    longest context (`max_context_len` when given, else `context_lens.max()`, a host sync on a GPU;
    tokens past it are not read), positions >= context_len masked. Block-table entries past a
    sequence's pages are never dereferenced."""
    B, Lq, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ctx = context_lens.to(device=q.device, dtype=torch.long)
    if B == 0:
        return torch.empty_like(q)
    L = int(ctx.max()) if max_context_len is None else int(max_context_len)
    n_pages = (L + page - 1) // page
    if n_pages > block_tables.shape[1]:
        raise ValueError(f"context of {L} tokens does not fit {block_tables.shape[1]} pages of {page}")
    used = torch.arange(n_pages, device=q.device) < ((ctx + page - 1) // page)[:, None]  # [B, n_pages]
    pages = torch.where(used, block_tables[:, :n_pages].to(q.device).long(), 0)
    k_pos = torch.arange(L, device=q.device)
    valid = k_pos[None, :] < ctx[:, None]  # [B, L]
    # [B, L, Hkv, D] -> [B, Hkv, 1, L, D]; the G query heads of a KV head share it (= repeat_interleave)
    kf = dequantize_kv(k_cache[pages].flatten(1, 2)[:, :L], k_scale, compute_dtype).permute(0, 2, 1, 3).unsqueeze(2)
    vf = dequantize_kv(v_cache[pages].flatten(1, 2)[:, :L], v_scale, compute_dtype)
    vf = vf.masked_fill(~valid[:, :, None, None], 0.0).permute(0, 2, 1, 3).unsqueeze(2)  # no 0 * garbage
    qf = q.to(compute_dtype).view(B, Lq, Hkv, group, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Lq, D]
    logits = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, L]
    q_pos = ctx[:, None] - Lq + torch.arange(Lq, device=q.device)  # [B, Lq]
    if alibi_slopes is not None:
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).to(compute_dtype)  # [B, Lq, L]
        slopes = alibi_slopes.to(device=q.device, dtype=compute_dtype).view(1, Hkv, group, 1, 1)
        logits = logits + slopes * rel[:, None, None]
    allowed = valid[:, None, :] & (k_pos[None, None, :] <= q_pos[:, :, None])  # [B, Lq, L]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    out = probs @ vf  # [B, Hkv, G, Lq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, Lq, Hq, D).to(q.dtype)


def _paged_decode_loop(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_decode_reference one sequence at a time (gather, then attention_reference): the oracle
    the tests check the batched version against. Not a serving path."""
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        kb = gather_paged_kv(k_cache, block_tables[b], length)[None]
        vb = gather_paged_kv(v_cache, block_tables[b], length)[None]
        out[b] = attention_reference(
            q[b : b + 1], kb, vb, causal=True, alibi_slopes=alibi_slopes, scale=scale,
            compute_dtype=compute_dtype, k_scale=k_scale, v_scale=v_scale,
        )[0]
    return out


def paged_prefill_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed queries against a paged cache: q [T, Hq, D] holds B sequences, sequence b's rows
    cu_seqlens_q[b] : cu_seqlens_q[b+1] being its last Lq_b of seq_lens[b] tokens (their K/V already in
    k/v_cache [num_pages, page_size, Hkv, D], read through block_tables[b]). Causal, bottom-right aligned:
    query i of b sits at position seq_lens[b] - Lq_b + i. Each sequence's K/V is gathered through its
    block table, then attention_reference. Returns [T, Hq, D], or writes `out`; rows of no sequence
    (>= cu_seqlens_q[B]) are zeros in a new tensor and left as they are in `out`. Reads the lengths on
    the host (a sync on a GPU) and raises ValueError for Lq_b > seq_lens[b] or a context that does not
    fit the block table."""
    result = torch.zeros_like(q) if out is None else out
    page = k_cache.shape[1]
    cq, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, n in enumerate(lens):
        qs, qe = cq[b], cq[b + 1]
        if qe == qs:
            continue
        if qe - qs > n:
            raise ValueError(f"sequence {b}: {qe - qs} queries but only {n} tokens in the cache")
        if n > block_tables.shape[1] * page:
            raise ValueError(f"sequence {b}: {n} tokens do not fit {block_tables.shape[1]} pages of {page}")
        kb = gather_paged_kv(k_cache, block_tables[b], n)[None]
        vb = gather_paged_kv(v_cache, block_tables[b], n)[None]
        result[qs:qe] = attention_reference(
            q[None, qs:qe], kb, vb, causal=True, alibi_slopes=alibi_slopes, scale=scale,
            compute_dtype=compute_dtype, k_scale=k_scale, v_scale=v_scale,
        )[0]
    return result
