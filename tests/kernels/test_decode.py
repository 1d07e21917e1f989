"""Paged decode kernel vs the PyTorch reference, and the cache writer."""

import importlib.util

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import write_kv_cache
from frugalserve.kernels.reference import gather_paged_kv, paged_decode_reference

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DT = torch.float16


def _paged(B, lens, hq, hkv, d, page, device, lq=1, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    max_pages = max((n + page - 1) // page for n in lens)
    num_pages = B * max_pages + 3
    k_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    tables = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages).int().to(device)  # shuffled
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(B, lq, hq, d, generator=g).to(device, dtype)
    return q, k_cache, v_cache, tables, ctx


@requires_triton
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (5, 1), (12, 3), (32, 8)])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_layouts(heads, alibi, splits, interp_device, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    hq, hkv = heads
    q, kc, vc, bt, ctx = _paged(3, [1, 37, 70], hq, hkv, 64, 16, interp_device, seed=hq + splits)
    s = alibi_slopes(hq, device=interp_device) if alibi else None
    out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits, block_n=16)
    assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s), DT)


@requires_triton
@pytest.mark.parametrize("lq", [2, 4])
@pytest.mark.parametrize("page", [5, 16])
def test_decode_few_queries_odd_pages(lq, page, interp_device, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx = _paged(2, [lq, 53], 8, 2, 80, page, interp_device, lq=lq, seed=lq * page)
    s = alibi_slopes(8, device=interp_device)
    out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=2, block_n=16)
    assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s), DT)


@requires_triton
def test_decode_default_splits_and_scale(interp_device, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx = _paged(2, [100, 260], 8, 2, 64, 16, interp_device, seed=11)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kc, vc, bt, ctx, scale=0.2, block_n=32, out=out)
    assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, scale=0.2), DT)


@requires_triton
def test_decode_bad_input(interp_device, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx = _paged(2, [10, 20], 8, 2, 64, 16, interp_device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(q[:, :, :7], kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_decode_attention(q, kc.float(), vc, bt, ctx)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q[..., :48], kc[..., :48], vc[..., :48], bt, ctx)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q, kc, vc, bt[:, :1], ctx)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kc, vc, bt.float(), ctx)


def test_write_kv_cache_roundtrip():
    g = torch.Generator().manual_seed(0)
    page, hkv, d = 4, 2, 32
    kc = torch.zeros(6, page, hkv, d)
    vc = torch.zeros(6, page, hkv, d)
    table = torch.tensor([5, 2, 0])
    n = 10
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    pos = torch.arange(n)
    slots = table[pos // page] * page + pos % page
    write_kv_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(gather_paged_kv(kc, table, n), k)
    torch.testing.assert_close(gather_paged_kv(vc, table, n), v)
    write_kv_cache(k[:2] * 0 + 7, v[:2], kc, vc, torch.tensor([-1, slots[1]]))  # -1 = padding, skipped
    assert torch.equal(kc.view(-1, hkv, d)[slots[0]], k[0]) and bool((kc.view(-1, hkv, d)[slots[1]] == 7).all())
    with pytest.raises(ValueError, match="dtype mismatch"):
        write_kv_cache(k.half(), v.half(), kc, vc, slots)
