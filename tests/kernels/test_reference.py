"""The batched paged-decode reference (the CPU serving path) against the per-sequence loop it replaced."""

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import _paged_decode_loop, paged_decode_reference

F64 = torch.float64


def _paged(lens, hq, hkv, d, page, lq, seed, dtype=F64, spare_pages=2):
    """Random caches; each sequence's pages shuffled; table entries past a sequence's pages are garbage
    (-1 or out of range), which neither version may dereference."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    max_pages = max((n + page - 1) // page for n in lens) + spare_pages
    num_pages = B * max_pages
    k_cache = torch.randn(num_pages, page, hkv, d, generator=g, dtype=dtype)
    v_cache = torch.randn(num_pages, page, hkv, d, generator=g, dtype=dtype)
    tables = torch.randperm(num_pages, generator=g).view(B, max_pages).int()
    for b, n in enumerate(lens):
        tables[b, (n + page - 1) // page :] = -1 if b % 2 else 10**6
    q = torch.randn(B, lq, hq, d, generator=g, dtype=dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (5, 1), (12, 3)])
@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("alibi", [False, True])
def test_batched_matches_loop(heads, lq, alibi):
    hq, hkv = heads
    for seed, (page, lens) in enumerate([(16, [1, 37, 70, 16]), (5, [3, 1, 12]), (1, [9, 4])]):
        q, kc, vc, bt, ctx = _paged(lens, hq, hkv, 24, page, lq, seed=seed * 10 + hq)
        s = alibi_slopes(hq) if alibi else None
        scale = 0.3 if seed == 1 else None
        out = paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s, scale=scale, compute_dtype=F64)
        oracle = _paged_decode_loop(q, kc, vc, bt, ctx, alibi_slopes=s, scale=scale, compute_dtype=F64)
        torch.testing.assert_close(out, oracle, atol=1e-12, rtol=1e-12)


def test_contexts_shorter_than_queries_and_empty():
    """context_lens 0 (padded rows) and < Lq: rows that see no key give 0, as in the loop."""
    q, kc, vc, bt, ctx = _paged([0, 2, 40, 0], 8, 2, 16, 8, lq=4, seed=7)
    s = alibi_slopes(8)
    out = paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s, compute_dtype=F64)
    torch.testing.assert_close(out, _paged_decode_loop(q, kc, vc, bt, ctx, alibi_slopes=s, compute_dtype=F64),
                               atol=1e-12, rtol=1e-12)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
    assert out[1, 2:].abs().sum() > 0


def test_max_context_len_and_garbage_in_unwritten_slots():
    """An explicit bound pads further without changing the result; NaN in slots past a context is never
    mixed in (the loop never gathers them)."""
    q, kc, vc, bt, ctx = _paged([13, 30, 1], 6, 3, 8, 4, lq=2, seed=9)
    for b, n in enumerate(ctx.tolist()):  # poison the tail of each sequence's last page
        page_idx, off = divmod(n, 4)
        if off:
            kc[bt[b, page_idx], off:] = float("nan")
            vc[bt[b, page_idx], off:] = float("nan")
    oracle = _paged_decode_loop(q, kc, vc, bt, ctx, compute_dtype=F64)
    assert torch.isfinite(oracle).all()
    for bound in (None, 30, 37):
        out = paged_decode_reference(q, kc, vc, bt, ctx, compute_dtype=F64, max_context_len=bound)
        torch.testing.assert_close(out, oracle, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_reference(q, kc, vc, bt, ctx, max_context_len=bt.shape[1] * 4 + 1)


def test_dispatch_decode_reference_path_fills_out(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "reference")
    q, kc, vc, bt, ctx = _paged([5, 17], 4, 2, 32, 8, lq=1, seed=2, dtype=torch.float32)
    out = torch.full_like(q, float("nan"))
    res = dispatch.decode(q, kc, vc, bt, ctx, max_context_len=17, num_splits=2, out=out)
    assert res is out
    torch.testing.assert_close(out, _paged_decode_loop(q, kc, vc, bt, ctx), atol=1e-6, rtol=1e-6)
