"""GPU, for the serving engine: every supported head dim at realistic sizes in bf16 and fp16, the
fixed-config prefill launch, and CUDA-graph capture of the KV-cache write and the paged decode.
Skipped without CUDA."""

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import write_kv_cache
from frugalserve.kernels.reference import (
    attention_reference,
    paged_decode_reference,
    varlen_attention_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HEAD_DIMS = [8, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256]
DTYPES = [torch.bfloat16, torch.float16]


def _rand(*shape, seed, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_prefill_head_dims_fixed_config(d, dtype, assert_close):
    """The serving launch (autotune=False) for every head dim: padded causal + ALiBi and non-causal,
    and packed ragged sequences, against the reference; no autotuning benchmark runs."""
    from frugalserve.kernels import prefill

    hq, hkv = (8, 2) if d % 16 else (12, 3)
    tuned_keys = len(prefill._prefill_kernel.cache)
    q, k, v = _rand(2, 333, hq, d, seed=1, dtype=dtype), _rand(2, 333, hkv, d, seed=2, dtype=dtype), \
        _rand(2, 333, hkv, d, seed=3, dtype=dtype)
    s = alibi_slopes(hq, device="cuda")
    for causal, slopes in ((True, s), (False, None)):
        out = prefill.flash_attention(q, k, v, causal=causal, alibi_slopes=slopes, autotune=False)
        assert_close(out, attention_reference(q, k, v, causal=causal, alibi_slopes=slopes), dtype)
    lens_q, lens_k = [1, 127, 128, 129, 700, 7], [1, 127, 200, 129, 700, 64]
    qv = _rand(sum(lens_q), hq, d, seed=4, dtype=dtype)
    kv, vv = _rand(sum(lens_k), hkv, d, seed=5, dtype=dtype), _rand(sum(lens_k), hkv, d, seed=6, dtype=dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = dispatch.attention_varlen(qv, kv, vv, cu_q, cu_k, max(lens_q), alibi_slopes=s, autotune=False)
    assert_close(out, varlen_attention_reference(qv, kv, vv, cu_q, cu_k, alibi_slopes=s), dtype)
    assert len(prefill._prefill_kernel.cache) == tuned_keys  # the autotuner was not consulted
    assert prefill._fixed_resolved[(str(q.device), d)] == prefill.fixed_shapes(d)[0]  # no fallback needed


@pytest.mark.parametrize("d", [72, 160, 256])
def test_prefill_autotuned_head_dims(d, monkeypatch, assert_close):
    """The benchmarks' autotuned path over the shapes pruned for this BLOCK_D class (FRUGALSERVE_AUTOTUNE
    unset so the tuning really runs), and the fixed config agrees with it."""
    from frugalserve.kernels import prefill

    monkeypatch.delenv("FRUGALSERVE_AUTOTUNE", raising=False)
    dtype = torch.bfloat16
    q, k, v = _rand(1, 1000, 16, d, seed=7, dtype=dtype), _rand(1, 1000, 4, d, seed=8, dtype=dtype), \
        _rand(1, 1000, 4, d, seed=9, dtype=dtype)
    s = alibi_slopes(16, device="cuda")
    ref = attention_reference(q, k, v, alibi_slopes=s)
    tuned = prefill.flash_attention(q, k, v, alibi_slopes=s)
    assert_close(tuned, ref, dtype)
    assert_close(prefill.flash_attention(q, k, v, alibi_slopes=s, autotune=False), ref, dtype)
    best = prefill._prefill_kernel.best_config
    assert prefill._shape(best) in prefill._TUNE_SHAPES[prefill._d_class(prefill._block_d(d))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_decode_head_dims(d, dtype, assert_close):
    """Every head dim: ragged contexts 1..4097, pages of 16 or 32, 1 and 3 query tokens, default and
    explicit splits; and the widest tile (128 query heads on one KV head: 8 warps at BLOCK_D 256)."""
    from frugalserve.kernels.decode import paged_decode_attention

    page = 16 if d % 16 else 32
    lens = [1, 100, 1500, 4097]
    max_pages = (max(lens) + page - 1) // page
    for (hq, hkv), lq in (((8, 2), 1), ((32, 8), 3), ((128, 1), 1)):
        P = len(lens) * max_pages + 5
        kc, vc = _rand(P, page, hkv, d, seed=10, dtype=dtype), _rand(P, page, hkv, d, seed=11, dtype=dtype)
        bt = torch.randperm(P, device="cuda")[: len(lens) * max_pages].view(len(lens), max_pages).int()
        ctx = torch.tensor([max(n, lq) for n in lens], dtype=torch.int32, device="cuda")
        q = _rand(len(lens), lq, hq, d, seed=12, dtype=dtype)
        s = alibi_slopes(hq, device="cuda")
        ref = paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s)
        for splits in (None, 1, 5):
            out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits,
                                         max_context_len=max(lens))
            assert_close(out, ref, dtype)


def _capture(fn):
    """Warm up (compile) on a side stream, then capture fn in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("d", [24, 128, 256])
def test_write_kv_cuda_graph(d):
    """dispatch.write_kv captured once, replayed with new keys/values and new slots (some, then all -1)."""
    dtype = torch.bfloat16
    T, hkv, page, P = 64, 8, 16, 40
    assert dispatch.decide("kv-write", "cuda", dtype, d, hkv, hkv).use_triton
    kc, vc = _rand(P, page, hkv, d, seed=1, dtype=dtype), _rand(P, page, hkv, d, seed=2, dtype=dtype)
    key = torch.empty(T, hkv, d, device="cuda", dtype=dtype)
    value = torch.empty_like(key)
    slots = torch.empty(T, device="cuda", dtype=torch.int64)

    def fill(seed, pad):
        g = torch.Generator(device="cuda").manual_seed(seed)
        key.copy_(torch.randn(key.shape, device="cuda", generator=g))
        value.copy_(torch.randn(value.shape, device="cuda", generator=g))
        new = torch.randperm(P * page, device="cuda", generator=g)[:T]
        new[torch.randperm(T, device="cuda", generator=g)[:pad]] = -1
        slots.copy_(new)

    fill(0, 3)
    graph = _capture(lambda: dispatch.write_kv(key, value, kc, vc, slots))
    for seed, pad in ((1, 0), (2, 9), (3, T)):
        fill(seed, pad)
        ref_k, ref_v = kc.clone(), vc.clone()
        write_kv_cache(key, value, ref_k, ref_v, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("d", [40, 128, 256])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_graph(d, splits, dtype, assert_close):
    """A decode bucket of 8 rows captured with static buffers, replayed with new queries, block tables and
    context lengths (padded rows with context 0 among them): same as eager and the reference."""
    B, hq, hkv, page, max_ctx = 8, 16, 4, 16, 1024
    max_pages = max_ctx // page
    P = B * max_pages + 8
    kc, vc = _rand(P, page, hkv, d, seed=1, dtype=dtype), _rand(P, page, hkv, d, seed=2, dtype=dtype)
    s = alibi_slopes(hq, device="cuda")
    q = torch.empty(B, 1, hq, d, device="cuda", dtype=dtype)
    bt = torch.zeros(B, max_pages, device="cuda", dtype=torch.int32)
    ctx = torch.zeros(B, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    kwargs = dict(alibi_slopes=s, max_context_len=max_ctx, num_splits=splits)

    def fill(seed, lens):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        bt.copy_(torch.randperm(P, device="cuda", generator=g)[: B * max_pages].view(B, max_pages))
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))

    fill(0, [5] * B)
    graph = _capture(lambda: dispatch.decode(q, kc, vc, bt, ctx, out=out, **kwargs))
    for seed, lens in ((1, [1, 0, 1024, 37, 0, 500, 16, 17]), (2, [1024] * 6 + [0, 0]), (3, [0] * B)):
        fill(seed, lens)
        graph.replay()
        torch.cuda.synchronize()
        captured = out.clone()
        assert torch.isfinite(captured).all()
        eager = dispatch.decode(q, kc, vc, bt, ctx, **kwargs)
        assert torch.equal(captured, eager)  # same kernels, same grid, same data
        assert_close(captured, paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s), dtype)
        for row, n in enumerate(lens):
            if n == 0:
                assert torch.equal(captured[row], torch.zeros_like(captured[row]))


@pytest.mark.parametrize("head_dim", [8, 24, 40])
@torch.no_grad()
def test_llama_zoo_head_dims_on_kernels_gpu(head_dim):
    """The demo zoo's head dims through transformers on the kernels: left-padded prefill, then a cached
    decode step fed the same token both ways (no sampling, so no diverging choices)."""
    from frugalserve.kernels import hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=8 * head_dim, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim)
    model = LlamaForCausalLM(cfg).cuda().half().eval()
    ids = torch.randint(0, 99, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0

    def run():
        first = model(ids, attention_mask=mask, use_cache=True)
        step = model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     past_key_values=first.past_key_values)
        return first.logits, step.logits

    ref = run()
    report = hf.enable_for_model(model)
    assert "triton kernels" in report and f"float16, head_dim {head_dim}, 8/2 heads supported" in report
    out = run()
    real = mask.bool()
    torch.testing.assert_close(out[0][real].float(), ref[0][real].float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(out[1].float(), ref[1].float(), atol=3e-2, rtol=0)
