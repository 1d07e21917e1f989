"""fp8 (e4m3) KV cache: the KV-write kernel's quantization against the reference (bit for bit), and the
decode, paged prefill and varlen prefill kernels reading fp8 against the float64 reference of the same
dequantized cache. CPU: the Triton interpreter, float16 queries, tiny shapes."""

import importlib.util

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_kv,
    quantize_fp8,
    write_kv_cache,
)
from frugalserve.kernels.reference import (
    attention_reference,
    paged_decode_reference,
    paged_prefill_reference,
    varlen_attention_reference,
)

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DT = torch.float16
# fp8 attention against the unquantized float64 attention, unit-normal K/V, scales amax x 2 / 448: e4m3
# keeps 3 mantissa bits, a relative rounding error <= 2^-4 per element. A row that sees one key returns that
# value, off by up to 2^-4 x |v| (|v| <= ~3.5 here: 0.22); rows over more keys average the errors down
# (~0.03 at 20 keys). An indexing or scale error is O(1).
FP8_QUANT_TOL = dict(atol=0.25, rtol=0.0)


def _scales(hkv, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(hkv, generator=g)) * 4 / FP8_MAX  # ~ amax 2..6 per head, as calibrated


def _fp8_paged(B, lens, hq, hkv, d, page, device, lq=1, seed=0):
    """q (fp16), fp8 caches quantized from unit-normal K/V with per-head scales, shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max((n + page - 1) // page for n in lens)
    num_pages = B * max_pages + 3
    k = torch.randn(num_pages, page, hkv, d, generator=g)
    v = torch.randn(num_pages, page, hkv, d, generator=g)
    # calibrated as the engine does: amax per KV head x 2 / 448
    ks, vs = (x.abs().amax(dim=(0, 1, 3)) * 2 / FP8_MAX for x in (k, v))
    kc, vc = quantize_fp8(k, ks).to(device), quantize_fp8(v, vs).to(device)
    tables = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages).int().to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(B, lq, hq, d, generator=g).to(device, DT)
    return q, kc, vc, tables, ctx, ks.to(device), vs.to(device), (k, v)


def test_quantize_saturates_and_rounds():
    scale = torch.tensor([0.5, 2.0])
    x = torch.tensor([[[1.0, 300.0, -1000.0, 1e-6]], [[3.0, 1e4, -7.0, 0.0]]]).transpose(0, 1)  # [1, 2, 4]
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    assert q.float()[0, 0].tolist() == [2.0, 448.0, -448.0, 0.0]  # 600 and -2000 saturate at +-448
    assert q.float()[0, 1].tolist() == [1.5, 448.0, -3.5, 0.0]
    assert torch.isfinite(dequantize_kv(q, scale, torch.float32)).all()


def test_reference_write_stores_fp8():
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(6, 2, 16, generator=g), torch.randn(6, 2, 16, generator=g)
    kc = torch.zeros(3, 4, 2, 16, dtype=FP8_DTYPE)
    vc = torch.zeros_like(kc)
    ks, vs = _scales(2, 3), _scales(2, 4)
    slots = torch.tensor([0, 5, -1, 7, 11, 2])
    write_kv_cache(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
    keep = slots >= 0
    flat = kc.view(-1, 2, 16)[slots[keep]]
    assert torch.equal(flat.view(torch.uint8), quantize_fp8(key[keep], ks).view(torch.uint8))
    with pytest.raises(ValueError, match="needs k_scale"):
        write_kv_cache(key, value, kc, vc, slots)
    with pytest.raises(ValueError, match="k_scale must be"):
        write_kv_cache(key, value, kc, vc, slots, k_scale=ks[:1].repeat(3), v_scale=vs)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("per_head", [True, False])
def test_write_kernel_matches_reference(dtype, per_head):
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    g = torch.Generator().manual_seed(5)
    T, hkv, d, page = 9, 3, 24, 4
    key = (torch.randn(T, hkv, d, generator=g) * 3).to(dtype)
    key[0, 0, :3] = torch.tensor([1e4, -1e4, 0.0]).to(dtype)  # saturates
    # values that round to zero keep their sign (-0 is 0x80), and subnormals on both sides
    key[1, 0, :4] = torch.tensor([-1e-7, 1e-7, -3e-5, 3e-5]).to(dtype)
    value = torch.randn(T, hkv, d, generator=g).to(dtype)
    ks, vs = (_scales(hkv, 7), _scales(hkv, 8)) if per_head else (torch.tensor([0.01]), torch.tensor([0.02]))
    slots = torch.randperm(5 * page, generator=g)[:T]
    slots[2] = -1
    ref_k = torch.zeros(5, page, hkv, d, dtype=FP8_DTYPE)
    ref_v, kc, vc = ref_k.clone(), ref_k.clone(), ref_k.clone()
    write_kv_cache(key, value, ref_k, ref_v, slots, k_scale=ks, v_scale=vs)
    write_kv_cache_triton(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
    assert torch.equal(kc.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_v.view(torch.uint8))


@requires_triton
@pytest.mark.parametrize("heads,d,alibi,splits,bn", [((8, 2), 64, True, 1, 16), ((12, 3), 40, True, 2, 16),
                                                     ((5, 1), 24, False, 3, None), ((4, 4), 80, True, 2, 16)])
def test_decode_fp8(heads, d, alibi, splits, bn, interp_device, assert_close):
    """bn None: the fp8 default, twice decode_block_n's keys per tile."""
    from frugalserve.kernels.decode import paged_decode_attention

    hq, hkv = heads
    q, kc, vc, bt, ctx, ks, vs, (k, v) = _fp8_paged(3, [1, 19, 37], hq, hkv, d, 8, interp_device, seed=d)
    s = alibi_slopes(hq, device=interp_device) if alibi else None
    out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits, block_n=bn,
                                 k_scale=ks, v_scale=vs)
    ref = paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s, compute_dtype=torch.float64,
                                 k_scale=ks, v_scale=vs)
    assert_close(out, ref, DT)
    # the quantization itself: against attention over the unquantized K/V, in float64
    exact = paged_decode_reference(q.double(), k.double().to(interp_device), v.double().to(interp_device), bt, ctx,
                                   alibi_slopes=s, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), exact, **FP8_QUANT_TOL)


@requires_triton
def test_decode_fp8_per_layer_scale(interp_device, assert_close):
    """vLLM's layout of the scales: one float32 scalar for every head of the layer."""
    from frugalserve.kernels.decode import paged_decode_attention

    q, kc, vc, bt, ctx, ks, vs, _ = _fp8_paged(2, [5, 30], 8, 2, 32, 16, interp_device, seed=3)
    k1, v1 = ks[:1].clone(), vs[:1].clone()
    out = paged_decode_attention(q, kc, vc, bt, ctx, num_splits=2, block_n=16, k_scale=k1, v_scale=v1)
    assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, compute_dtype=torch.float64, k_scale=k1,
                                             v_scale=v1), DT)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_decode_attention(q, kc, vc, bt, ctx)


@requires_triton
@pytest.mark.parametrize("heads,d", [((8, 2), 40), ((12, 3), 24)])
def test_paged_prefill_fp8(heads, d, interp_device, assert_close):
    """A mixed step (decode, padded sequence, whole prompt, chunk after a cached prefix) on an fp8 cache."""
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    hq, hkv = heads
    spec = [(1, 21), (0, 5), (11, 11), (6, 25)]
    lens = [n for _, n in spec]
    _, kc, vc, bt, seq_lens, ks, vs, _ = _fp8_paged(len(spec), lens, hq, hkv, d, 4, interp_device, seed=hq)
    lq = [n for n, _ in spec]
    cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=interp_device)
    q = torch.randn(sum(lq) + 2, hq, d, generator=torch.Generator().manual_seed(9)).to(interp_device, DT)
    s = alibi_slopes(hq, device=interp_device)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, bt, cu, seq_lens, max_seqlen_q=max(lq), alibi_slopes=s, out=out,
                            k_scale=ks, v_scale=vs)
    n = int(cu[-1])
    assert torch.isnan(out[n:]).all()
    ref = paged_prefill_reference(q, kc, vc, bt, cu, seq_lens, alibi_slopes=s, compute_dtype=torch.float64,
                                  k_scale=ks, v_scale=vs)
    assert_close(out[:n], ref[:n], DT)


@requires_triton
def test_varlen_prefill_fp8(interp_device, assert_close):
    """The varlen prefill kernel on fp8 K/V (a context gathered from an fp8 cache), GQA + ALiBi, odd dim."""
    from frugalserve.kernels.prefill import flash_attention_varlen

    g = torch.Generator().manual_seed(4)
    hq, hkv, d = 6, 2, 24
    lens_q, lens_k = [1, 9, 17], [12, 9, 33]
    ks, vs = _scales(hkv, 11).to(interp_device), _scales(hkv, 12).to(interp_device)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(interp_device, DT)
    k = quantize_fp8(torch.randn(sum(lens_k), hkv, d, generator=g), ks.cpu()).to(interp_device)
    v = quantize_fp8(torch.randn(sum(lens_k), hkv, d, generator=g), vs.cpu()).to(interp_device)
    cu_q = torch.tensor([0, 1, 10, 27], dtype=torch.int32, device=interp_device)
    cu_k = torch.tensor([0, 12, 21, 54], dtype=torch.int32, device=interp_device)
    s = alibi_slopes(hq, device=interp_device)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), alibi_slopes=s, k_scale=ks, v_scale=vs)
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k, alibi_slopes=s, compute_dtype=torch.float64,
                                     k_scale=ks, v_scale=vs)
    assert_close(out, ref, DT)


def test_dispatch_fp8(monkeypatch):
    """decide names the fp8 cache; the reference path (CPU) stores fp8 and reads it back through the scale."""
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", "reference")
    d = dispatch.decide("decode", "cpu", torch.float16, 64, 8, 2, kv_dtype=FP8_DTYPE)
    assert not d.use_triton
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", "auto")
    bad = dispatch._unsupported("decode", torch.float16, 64, 4, 1, torch.bfloat16)
    assert bad is not None and "KV cache" in bad
    assert dispatch._unsupported("kv-write", torch.float32, 40, 1, 1, FP8_DTYPE) is None
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    kc = torch.zeros(2, 4, 2, 16, dtype=FP8_DTYPE)
    vc = torch.zeros_like(kc)
    ks, vs = torch.full((2,), 0.01), torch.full((2,), 0.01)
    dispatch.write_kv(k, v, kc, vc, torch.arange(4, 8), k_scale=ks, v_scale=vs)
    q = torch.randn(1, 4, 4, 16, generator=g)
    bt = torch.tensor([[1]], dtype=torch.int32)
    out = dispatch.paged_prefill(q[0], kc, vc, bt, torch.tensor([0, 4], dtype=torch.int32),
                                 torch.tensor([4], dtype=torch.int32), max_seqlen_q=4, k_scale=ks, v_scale=vs)
    exact = attention_reference(q, k[None], v[None], compute_dtype=torch.float64)[0]
    torch.testing.assert_close(out.double(), exact.double(), **FP8_QUANT_TOL)


def test_vllm_backend_fp8_cache_pieces():
    """The vLLM backend's own pieces on vLLM's fp8 cache (bytes [num_blocks, Hkv, block, 2 * D], one
    scale per layer), without vLLM: split as e4m3, written quantized, a mixed batch attended."""
    from frugalserve.kernels import vllm_backend as vb

    g = torch.Generator().manual_seed(6)
    hq, hkv, d, block = 4, 2, 16, 4
    raw = torch.zeros(6, hkv, block, 2 * d, dtype=torch.uint8)
    kc, vc = vb.split_kv_cache(raw, d, "fp8")
    assert kc.dtype == FP8_DTYPE and kc.shape == (6, block, hkv, d)
    assert vb.unsupported_reasons(head_size=d, num_heads=hq, num_kv_heads=hkv, kv_cache_dtype="fp8_e4m3") == []
    assert "fp8_e5m2" in vb.unsupported_reasons(head_size=d, num_heads=hq, num_kv_heads=hkv,
                                                kv_cache_dtype="fp8_e5m2")[0]
    k_scale, v_scale = torch.tensor(0.01), torch.tensor(0.008)  # vLLM's layer._k_scale / _v_scale
    lens, table = [5, 3], torch.tensor([[3, 1], [5, 0]], dtype=torch.int32)
    k = [torch.randn(n, hkv, d, generator=g) for n in lens]
    v = [torch.randn(n, hkv, d, generator=g) for n in lens]
    slots = torch.cat([table[r, torch.arange(n) // block] * block + torch.arange(n) % block
                       for r, n in enumerate(lens)])
    vb.write_kv(torch.cat(k), torch.cat(v), kc, vc, slots, k_scale, v_scale)
    # this step: request 0 decodes its last token, request 1 prefills all three
    qsl, seq = torch.tensor([0, 1, 4], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(4, hq, d, generator=g)
    out = torch.full_like(query, float("nan"))
    vb.attend(query, kc, vc, table, qsl, seq, out, max_query_len=3, scale=d ** -0.5, alibi_slopes=None,
              k_scale=k_scale, v_scale=v_scale)
    for r, (lo, hi) in enumerate([(0, 1), (1, 4)]):
        kq, vq = quantize_fp8(k[r], k_scale.reshape(1)), quantize_fp8(v[r], v_scale.reshape(1))
        ref = attention_reference(query[None, lo:hi], kq[None], vq[None], compute_dtype=torch.float64,
                                  k_scale=k_scale.reshape(1), v_scale=v_scale.reshape(1))[0]
        torch.testing.assert_close(out[lo:hi].double(), ref.double(), atol=1e-5, rtol=1e-5)
