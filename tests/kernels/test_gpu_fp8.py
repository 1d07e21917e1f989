"""GPU, fp8 (e4m3) KV cache at realistic sizes: the KV-write kernel's quantization bit for bit against the
reference, the decode, paged prefill and varlen prefill kernels on fp8 caches (bf16 and fp16 queries)
against the float64 reference of the same dequantized cache, and a CUDA-graph capture of write + decode.
Skipped without CUDA."""

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import FP8_DTYPE, FP8_MAX, quantize_fp8, write_kv_cache
from frugalserve.kernels.reference import (
    paged_decode_reference,
    paged_prefill_reference,
    varlen_attention_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.bfloat16, torch.float16]


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def _cache(num_pages, page, hkv, d, seed):
    """fp8 K/V caches quantized from unit-normal values with calibrated per-head scales (amax x 2 / 448)."""
    k, v = _rand(num_pages, page, hkv, d, seed=seed), _rand(num_pages, page, hkv, d, seed=seed + 1)
    ks, vs = (x.abs().amax(dim=(0, 1, 3)) * 2 / FP8_MAX for x in (k, v))
    return quantize_fp8(k, ks), quantize_fp8(v, vs), ks, vs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_write_kernel_quantizes_as_reference(dtype, d):
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    T, hkv, page = 3000, 8, 16
    key, value = _rand(T, hkv, d, seed=1, dtype=dtype) * 4, _rand(T, hkv, d, seed=2, dtype=dtype)
    key[0, 0, :2] = 1e4  # saturates
    ks, vs = torch.rand(hkv, device="cuda") * 0.02 + 0.001, torch.rand(hkv, device="cuda") * 0.02 + 0.001
    slots = torch.randperm(400 * page, device="cuda")[:T]
    slots[::7] = -1
    ref_k = torch.zeros(400, page, hkv, d, dtype=FP8_DTYPE, device="cuda")
    ref_v, kc, vc = ref_k.clone(), ref_k.clone(), ref_k.clone()
    write_kv_cache(key, value, ref_k, ref_v, slots, k_scale=ks, v_scale=vs)
    write_kv_cache_triton(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
    assert torch.equal(kc.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_v.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [((32, 8), 128), ((12, 3), 80), ((8, 1), 64), ((16, 16), 256)])
def test_decode_fp8(heads, d, dtype, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    hq, hkv = heads
    lens = [1, 17, 1000, 4097]
    page = 16
    width = max(-(-n // page) for n in lens)
    kc, vc, ks, vs = _cache(len(lens) * width + 1, page, hkv, d, seed=d)
    bt = torch.randperm(len(lens) * width, device="cuda").view(len(lens), width).int() + 1
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = _rand(len(lens), 1, hq, d, seed=3, dtype=dtype)
    s = alibi_slopes(hq, device="cuda")
    ref = paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s, compute_dtype=torch.float64,
                                 k_scale=ks, v_scale=vs)
    for splits in (None, 1, 7):
        out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits, k_scale=ks,
                                     v_scale=vs)
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [((32, 8), 128), ((12, 3), 40), ((5, 1), 96)])
def test_paged_prefill_fp8(heads, d, dtype, assert_close):
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    hq, hkv = heads
    spec = [(1, 300), (0, 9), (700, 700), (129, 2000), (1, 1)]
    page = 16
    width = max(-(-n // page) for _, n in spec) + 1
    kc, vc, ks, vs = _cache(len(spec) * width + 1, page, hkv, d, seed=hq)
    bt = torch.randperm(len(spec) * width, device="cuda").view(len(spec), width).int() + 1
    lq = [n for n, _ in spec]
    cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([n for _, n in spec], dtype=torch.int32, device="cuda")
    q = _rand(sum(lq), hq, d, seed=5, dtype=dtype)
    s = alibi_slopes(hq, device="cuda")
    out = paged_prefill_attention(q, kc, vc, bt, cu, seq_lens, max_seqlen_q=max(lq), alibi_slopes=s,
                                  k_scale=ks, v_scale=vs)
    ref = paged_prefill_reference(q, kc, vc, bt, cu, seq_lens, alibi_slopes=s, compute_dtype=torch.float64,
                                  k_scale=ks, v_scale=vs)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_prefill_fp8(dtype, assert_close):
    from frugalserve.kernels.prefill import flash_attention_varlen

    hq, hkv, d = 32, 8, 128
    lens_q, lens_k = [1, 127, 700, 64], [1, 127, 900, 1500]
    ks, vs = torch.full((hkv,), 0.02, device="cuda"), torch.full((hkv,), 0.015, device="cuda")
    q = _rand(sum(lens_q), hq, d, seed=6, dtype=dtype)
    k = quantize_fp8(_rand(sum(lens_k), hkv, d, seed=7), ks)
    v = quantize_fp8(_rand(sum(lens_k), hkv, d, seed=8), vs)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                   device="cuda")
    s = alibi_slopes(hq, device="cuda")
    out = flash_attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), alibi_slopes=s, autotune=False,
                                 k_scale=ks, v_scale=vs)
    ref = varlen_attention_reference(q, k, v, cu(lens_q), cu(lens_k), alibi_slopes=s,
                                     compute_dtype=torch.float64, k_scale=ks, v_scale=vs)
    assert_close(out, ref, dtype)


def test_fp8_write_and_decode_in_a_cuda_graph(assert_close):
    """KV write (quantizing) + decode on an fp8 cache captured once, replayed with new tokens and scales."""
    from frugalserve.kernels.decode import paged_decode_attention
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    B, hq, hkv, d, page, width = 8, 32, 8, 128, 16, 64
    kc = torch.zeros(B * width + 1, page, hkv, d, dtype=FP8_DTYPE, device="cuda")
    vc = torch.zeros_like(kc)
    ks, vs = torch.full((hkv,), 0.02, device="cuda"), torch.full((hkv,), 0.02, device="cuda")
    bt = (torch.arange(B * width, device="cuda").view(B, width) + 1).int()
    ctx = torch.full((B,), 1, dtype=torch.int32, device="cuda")
    slots = torch.full((B,), -1, dtype=torch.int32, device="cuda")
    q = torch.zeros(B, 1, hq, d, dtype=torch.bfloat16, device="cuda")
    key = torch.zeros(B, hkv, d, dtype=torch.bfloat16, device="cuda")
    value = torch.zeros_like(key)
    out = torch.empty_like(q)

    def step():
        write_kv_cache_triton(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
        paged_decode_attention(q, kc, vc, bt, ctx, max_context_len=width * page, num_splits=4, out=out,
                               k_scale=ks, v_scale=vs)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    kc.copy_(quantize_fp8(_rand(*kc.shape, seed=9), ks))
    vc.copy_(quantize_fp8(_rand(*vc.shape, seed=10), vs))
    lens = torch.randint(1, width * page, (B,), device="cuda", dtype=torch.int32)
    ctx.copy_(lens)
    slots.copy_(bt[torch.arange(B), (lens - 1) // page] * page + (lens - 1) % page)
    q.copy_(_rand(*q.shape, seed=11, dtype=torch.bfloat16))
    key.copy_(_rand(*key.shape, seed=12, dtype=torch.bfloat16))
    value.copy_(_rand(*value.shape, seed=13, dtype=torch.bfloat16))
    ks.fill_(0.03)
    graph.replay()
    torch.cuda.synchronize()
    ref_k, ref_v = kc.clone(), vc.clone()
    # the replay's write, once more through the reference: same bytes
    write_kv_cache(key, value, ref_k, ref_v, slots, k_scale=ks, v_scale=vs)
    assert torch.equal(ref_k.view(torch.uint8), kc.view(torch.uint8))
    ref = paged_decode_reference(q, kc, vc, bt, ctx, compute_dtype=torch.float64, k_scale=ks, v_scale=vs)
    assert_close(out, ref, torch.bfloat16)
