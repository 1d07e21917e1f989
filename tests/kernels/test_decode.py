"""Paged decode kernel vs the PyTorch reference."""

import importlib.util

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import paged_decode_reference

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DT = torch.float16
HEAD_DIMS = [8, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256]
LAYOUTS = [(4, 4), (8, 2), (5, 1), (12, 3)]
PAGES = [5, 8, 16, 32]


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
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_decode_head_dims(d, interp_device, assert_close):
    """Every head dim: ragged contexts (1, a page boundary, a tail), a page size and a GQA layout per dim,
    one and several query tokens, with and without splits, the default block_n for the dim."""
    from frugalserve.kernels.decode import paged_decode_attention

    i = HEAD_DIMS.index(d)
    hq, hkv = LAYOUTS[i % 4]
    page = PAGES[(i + i // 4) % 4]  # not tied to the layout
    lq = 1 + i % 2
    q, kc, vc, bt, ctx = _paged(3, [1, 2 * page, 45], hq, hkv, d, page, interp_device, lq=lq, seed=d)
    s = alibi_slopes(hq, device=interp_device)
    for splits in (1, 2):
        out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits, max_context_len=45)
        assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s), DT)


@requires_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_zero_context_rows(splits, interp_device, assert_close):
    """Padded rows of a CUDA-graph bucket (context_lens 0, block-table row of garbage) give zeros."""
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx = _paged(4, [0, 30, 0, 1], 8, 2, 40, 8, interp_device, seed=splits)
    bt[0] = 10**6  # never read: a row with context 0 loads no page
    bt[2] = -1
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kc, vc, bt, ctx, num_splits=splits, max_context_len=32, block_n=16, out=out)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx), DT)


def test_int32_indices_are_not_copied():
    """int32 tensors with a unit last stride go to the kernel as they are (CUDA-graph static buffers)."""
    from frugalserve.kernels.checks import check_index

    bt = torch.arange(24, dtype=torch.int32).view(4, 6)
    assert check_index("block_tables", bt, (4, 6), bt.device) is bt
    view = bt[:3, :4]  # a graph bucket's rows of a larger static table: row stride 6
    assert check_index("block_tables", view, (3, 4), bt.device) is view
    ctx = torch.tensor([3, 1, 0, 7], dtype=torch.int32)
    assert check_index("context_lens", ctx, (4,), ctx.device) is ctx
    converted = check_index("context_lens", ctx.long(), (4,), ctx.device)
    assert converted.dtype == torch.int32 and torch.equal(converted, ctx)
    strided = check_index("context_lens", bt[:, 0], (4,), bt.device)
    assert strided.is_contiguous() and torch.equal(strided, bt[:, 0])


@requires_triton
def test_decode_bad_input(interp_device, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx = _paged(2, [10, 20], 8, 2, 64, 16, interp_device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(q[:, :, :7], kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_decode_attention(q, kc.float(), vc, bt, ctx)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q[..., :50], kc[..., :50], vc[..., :50], bt, ctx)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q, kc, vc, bt[:, :1], ctx)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kc, vc, bt.float(), ctx)
