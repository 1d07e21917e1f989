"""Paged prefill kernel (mixed steps: decodes and prefill chunks in one launch) vs the PyTorch reference.

CPU: the Triton interpreter, float16, small shapes; the interpreter's tiles are small (32 rows x 16 keys,
16 x 16 for decode-only launches), so short sequences still span several query tiles and key blocks.
"""

import importlib.util

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import (
    gather_paged_kv,
    paged_decode_reference,
    paged_prefill_reference,
    varlen_attention_reference,
)

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DT = torch.float16
LAYOUTS = [(4, 4), (8, 2), (5, 1), (12, 3)]
# (Lq, seq_len) per sequence: a decode against a cached prefix, a padded sequence (Lq 0), a whole prompt,
# a chunk continuing a cached prefix, a decode of a 1-token sequence, a long chunk after a ragged prefix
MIXED = [(1, 30), (0, 7), (17, 17), (5, 22), (1, 1), (40, 51)]
PAD_ROWS = 3  # rows of q past cu_seqlens_q[B]: never written


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _step(spec, hq, hkv, d, page, device, seed=0, dtype=DT, pad_rows=PAD_ROWS, spare=1):
    """Random paged caches and a packed query batch for `spec` [(Lq, seq_len)]: shuffled pages, `spare`
    columns past the longest sequence in the block table, `pad_rows` rows of q past the last sequence."""
    g = torch.Generator().manual_seed(seed)
    lq = [n for n, _ in spec]
    lens = [s for _, s in spec]
    B = len(spec)
    width = max((n + page - 1) // page for n in lens) + spare
    num_pages = B * width + 3
    k_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    tables = torch.randperm(num_pages, generator=g)[: B * width].view(B, width).int().to(device)
    q = torch.randn(sum(lq) + pad_rows, hq, d, generator=g).to(device, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, _cu(lq, device), seq_lens


def _check(spec, hq, hkv, d, page, device, assert_close, *, alibi=True, seed=0, max_seqlen_q=None, scale=None):
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    q, kc, vc, bt, cu, lens = _step(spec, hq, hkv, d, page, device, seed=seed)
    s = alibi_slopes(hq, device=device) if alibi else None
    out = torch.full_like(q, float("nan"))  # poisoned: every valid row must be written
    if max_seqlen_q is None:
        max_seqlen_q = max(n for n, _ in spec)
    res = paged_prefill_attention(q, kc, vc, bt, cu, lens, max_seqlen_q=max_seqlen_q, alibi_slopes=s,
                                  scale=scale, out=out)
    assert res is out
    n = int(cu[-1])
    assert torch.isnan(out[n:]).all(), "rows past cu_seqlens_q[B] must be left untouched"
    ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s, scale=scale)
    assert_close(out[:n], ref[:n], DT)
    return out[:n], ref[:n]


@requires_triton
@pytest.mark.parametrize("heads", LAYOUTS)
@pytest.mark.parametrize("alibi", [False, True])
def test_mixed_step_layouts(heads, alibi, interp_device, assert_close):
    """Decodes, a padded sequence, whole prompts and chunks after cached prefixes in one launch."""
    hq, hkv = heads
    _check(MIXED, hq, hkv, 64, 4, interp_device, assert_close, alibi=alibi, seed=hq + alibi)


HEAD_DIMS = [8, 24, 40, 64, 128, 256]
PAGES = [1, 4, 16]


@requires_triton
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_and_pages(d, interp_device, assert_close):
    """Every head-dim class (BLOCK_D 16 .. 256, padded and exact), a page size and a layout per dim not
    tied to each other; ragged cached prefixes that end mid-page and on a page boundary."""
    i = HEAD_DIMS.index(d)
    hq, hkv = LAYOUTS[i % 4]
    page = PAGES[i % 3]
    spec = [(3, 3 + 2 * page), (1, 19), (23, 33), (0, 0), (1, 2 * page)]
    _check(spec, hq, hkv, d, page, interp_device, assert_close, seed=d)


@requires_triton
@pytest.mark.parametrize("page", PAGES)
def test_decode_only_matches_decode_kernel(page, interp_device, assert_close):
    """All Lq = 1 (the narrow tile): equal to the reference and to the paged decode kernel."""
    from frugalserve.kernels.decode import paged_decode_attention
    from frugalserve.kernels.paged_prefill import paged_prefill_attention, tile_shape

    spec = [(1, 1), (1, 37), (1, 16), (1, 70), (1, 5)]
    out, _ = _check(spec, 12, 3, 40, page, interp_device, assert_close, seed=page)
    assert tile_shape(40, 4, 1)[0] == 16  # decode-only launches take the 16-row tile
    q, kc, vc, bt, cu, lens = _step(spec, 12, 3, 40, page, interp_device, seed=page)
    s = alibi_slopes(12, device=interp_device)
    n = len(spec)
    dec = paged_decode_attention(q[:n, None], kc, vc, bt, lens, alibi_slopes=s, max_context_len=70, num_splits=2)
    assert_close(out, dec[:, 0], DT)
    again = paged_prefill_attention(q, kc, vc, bt, cu, lens, max_seqlen_q=1, alibi_slopes=s)
    assert torch.equal(again[:n], out)  # out=None gives the same rows


@requires_triton
def test_max_seqlen_q_only_picks_the_tile(interp_device, assert_close):
    """A max_seqlen_q below the longest chunk selects the decode tile; every row is still computed."""
    _check(MIXED, 8, 2, 32, 4, interp_device, assert_close, max_seqlen_q=1, seed=3)


@requires_triton
def test_large_group_split_in_chunks(interp_device, assert_close):
    """20 query heads per KV head: two head chunks of 16 per KV head, the second one partial."""
    _check(MIXED[:4], 40, 2, 32, 16, interp_device, assert_close, seed=5)


@requires_triton
def test_padded_bucket_reads_nothing_of_empty_sequences(interp_device, assert_close):
    """A graph bucket's padded sequences (Lq 0): their block-table rows and seq_lens are garbage and never
    read; trailing rows of q stay untouched; the scale is honoured; a sequence fills its table row."""
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    spec = [(0, 0), (6, 40), (0, 0), (1, 9), (0, 0)]
    q, kc, vc, bt, cu, lens = _step(spec, 8, 2, 24, 4, interp_device, seed=7, pad_rows=9, spare=0)
    bt[0] = 10**6
    bt[2] = -1
    bt[4] = 10**6
    lens[0], lens[2], lens[4] = 10**6, -5, 10**6
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, bt, cu, lens, max_seqlen_q=6, scale=0.3, out=out)
    n = int(cu[-1])
    assert torch.isnan(out[n:]).all() and not torch.isnan(out[:n]).any()
    ok = [b for b, (lq, _) in enumerate(spec) if lq]
    cu_ok = _cu([spec[b][0] for b in ok], interp_device)
    ref = paged_prefill_reference(q, kc, vc, bt[ok], cu_ok, lens[ok], scale=0.3)
    assert_close(out[:n], ref[:n], DT)


@requires_triton
def test_seq_len_past_the_table_is_clamped(interp_device, assert_close):
    """seq_lens beyond the block table's pages (a broken contract): no key past the table is read, the
    sequence ends where the table does."""
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    spec = [(5, 20), (1, 7)]
    q, kc, vc, bt, cu, lens = _step(spec, 4, 4, 16, 4, interp_device, seed=8, spare=0)
    out = paged_prefill_attention(q, kc, vc, bt, cu, lens + 1000, max_seqlen_q=5)
    ref = paged_prefill_reference(q, kc, vc, bt, cu, torch.minimum(lens + 1000, torch.tensor(20)))
    assert_close(out[:6], ref[:6], DT)


def test_tile_shapes(monkeypatch):
    """GPU tiles (read with the interpreter off): fixed per BLOCK_D class, the 16-row tile for decode-only
    launches; at most 128 fp32 accumulator floats per thread."""
    from frugalserve.kernels import paged_prefill

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert paged_prefill.pack(12, 3) == (4, 1) and paged_prefill.pack(40, 2) == (16, 2)
    for d in (8, 24, 40, 64, 72, 128, 160, 256):
        wide, narrow = paged_prefill.tile_shape(d, 4, 4096), paged_prefill.tile_shape(d, 4, 4)
        assert narrow[0] == 16 and wide[0] >= 64
        assert paged_prefill.tile_shape(d, 4, 5) == wide  # 20 rows: the chunk tile
        assert paged_prefill.tile_shape(d, 16, 1) == narrow
        block_d = paged_prefill._block_d(d)
        for m, n, warps, _ in (wide, narrow):
            assert m * block_d // (32 * warps) <= 128
            assert n * block_d * 2 <= 16 * 1024  # a K or V tile of at most 16 KB in bf16
    assert paged_prefill.tile_shape(40, 4, 4096) == paged_prefill.tile_shape(64, 1, 4096)  # BLOCK_D 64
    assert paged_prefill.tile_shape(160, 4, 4096) == paged_prefill.tile_shape(256, 4, 4096)


@requires_triton
def test_dispatch_paged_prefill(monkeypatch, caplog, assert_close):
    """dispatch.paged_prefill: the reference on CPU, the kernel when forced (interpreter), each decision
    logged once with decide's reason; neither writes rows past cu_seqlens_q[B] of `out`."""
    import logging

    from frugalserve.kernels import dispatch

    monkeypatch.setattr(dispatch, "_logged", set())
    caplog.set_level(logging.INFO, logger="frugalserve.kernels")
    q, kc, vc, bt, cu, lens = _step(MIXED, 8, 2, 40, 4, "cpu", seed=9)
    n = int(cu[-1])
    outs = {}
    for mode in ("auto", "triton"):
        monkeypatch.setenv(dispatch.ENV, mode)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        out = torch.full_like(q, float("nan"))
        assert dispatch.paged_prefill(q, kc, vc, bt, cu, lens, max_seqlen_q=40, out=out) is out
        assert torch.isnan(out[n:]).all() and not torch.isnan(out[:n]).any()
        why = dispatch.decide("paged-prefill", "cpu", DT, 40, 8, 2).reason
        assert f"paged prefill attention: {'triton' if mode == 'triton' else 'reference'} ({why})" in caplog.text
        outs[mode] = out[:n]
    assert_close(outs["triton"], outs["auto"], DT)


# ---- the reference, against the other references (no Triton) ---------------------------------------


def test_reference_matches_decode_and_varlen_references():
    """float64: Lq = 1 everywhere equals the batched decode reference; a mixed step equals varlen attention
    over the keys gathered into contiguous tensors."""
    spec = [(1, 13), (1, 1), (1, 40)]
    q, kc, vc, bt, cu, lens = _step(spec, 8, 2, 16, 4, "cpu", seed=1, dtype=torch.float64, pad_rows=0)
    s = alibi_slopes(8)
    ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s, compute_dtype=torch.float64)
    dec = paged_decode_reference(q[:, None], kc, vc, bt, lens, alibi_slopes=s, compute_dtype=torch.float64)
    torch.testing.assert_close(ref, dec[:, 0], atol=1e-12, rtol=0)

    q, kc, vc, bt, cu, lens = _step(MIXED, 12, 3, 16, 4, "cpu", seed=2, dtype=torch.float64, pad_rows=2)
    ks = torch.cat([gather_paged_kv(kc, bt[b], n) for b, (_, n) in enumerate(MIXED)])
    vs = torch.cat([gather_paged_kv(vc, bt[b], n) for b, (_, n) in enumerate(MIXED)])
    cu_k = _cu([n for _, n in MIXED], "cpu")
    s = alibi_slopes(12)
    ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s, compute_dtype=torch.float64)
    var = varlen_attention_reference(q, ks, vs, cu, cu_k, alibi_slopes=s, compute_dtype=torch.float64)
    torch.testing.assert_close(ref, var, atol=1e-12, rtol=0)
    assert torch.equal(ref[-2:], torch.zeros_like(ref[-2:]))  # rows of no sequence: zeros in a new tensor


def test_reference_rejects_bad_lengths():
    q, kc, vc, bt, cu, lens = _step([(4, 9)], 4, 4, 16, 4, "cpu")
    with pytest.raises(ValueError, match="4 queries but only 3 tokens"):
        paged_prefill_reference(q, kc, vc, bt, cu, torch.tensor([3]))
    with pytest.raises(ValueError, match="do not fit"):
        paged_prefill_reference(q, kc, vc, bt[:, :2], cu, lens)


# ---- bad input -----------------------------------------------------------------------------------


@requires_triton
def test_bad_input(interp_device):
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    q, kc, vc, bt, cu, lens = _step([(3, 10), (1, 5)], 8, 2, 64, 4, interp_device)
    kw = dict(max_seqlen_q=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_prefill_attention(q[:, :7], kc, vc, bt, cu, lens, **kw)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_prefill_attention(q, kc.float(), vc, bt, cu, lens, **kw)
    with pytest.raises(ValueError, match="not supported"):
        paged_prefill_attention(q.float(), kc.float(), vc.float(), bt, cu, lens, **kw)
    with pytest.raises(ValueError, match="head_dim 50 is not supported"):
        paged_prefill_attention(q[..., :50], kc[..., :50], vc[..., :50], bt, cu, lens, **kw)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(q, kc, vc, bt[:1], cu, lens, **kw)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_prefill_attention(q, kc, vc, bt, cu, lens[:1], **kw)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, kc, vc, bt, cu[:1], lens, **kw)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32 or int64"):
        paged_prefill_attention(q, kc, vc, bt, cu.float(), lens, **kw)
    with pytest.raises(ValueError, match="out must be"):
        paged_prefill_attention(q, kc, vc, bt, cu, lens, out=q[:-1], **kw)
    with pytest.raises(ValueError, match="alibi_slopes"):
        paged_prefill_attention(q, kc, vc, bt, cu, lens, alibi_slopes=torch.ones(3), **kw)
