"""GPU variants: bfloat16, larger shapes, int32-overflow offsets, models on the kernels. Skipped without CUDA."""

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import (
    attention_reference,
    paged_decode_reference,
    varlen_attention_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BF = torch.bfloat16


def _rand(*shape, seed=0, dtype=BF):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


CASES = [(h, 128, c, BF) for h in [(4, 4), (8, 2), (5, 1), (12, 3), (32, 8)] for c in (True, False)]
CASES += [((8, 2), d, True, BF) for d in (64, 80, 96)] + [((12, 3), 128, True, torch.float16)]


@pytest.mark.parametrize("heads,d,causal,dtype", CASES)
def test_prefill_gpu(heads, d, causal, dtype, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    hq, hkv = heads
    q, k, v = _rand(2, 333, hq, d, seed=1, dtype=dtype), _rand(2, 333, hkv, d, seed=2, dtype=dtype), \
        _rand(2, 333, hkv, d, seed=3, dtype=dtype)
    for s in (None, alibi_slopes(hq, device="cuda")):
        out = flash_attention(q, k, v, causal=causal, alibi_slopes=s)
        assert_close(out, attention_reference(q, k, v, causal=causal, alibi_slopes=s), dtype)


def test_varlen_gpu(assert_close):
    from frugalserve.kernels.prefill import flash_attention_varlen

    lens = [1, 127, 128, 129, 1000, 7]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = _rand(sum(lens), 32, 128, seed=4), _rand(sum(lens), 8, 128, seed=5), _rand(sum(lens), 8, 128, seed=6)
    s = alibi_slopes(32, device="cuda")
    out = flash_attention_varlen(q, k, v, cu, cu, max(lens), alibi_slopes=s)
    assert_close(out, varlen_attention_reference(q, k, v, cu, cu, alibi_slopes=s), BF)


@pytest.mark.parametrize("heads", [(8, 2), (5, 1), (32, 8)])
@pytest.mark.parametrize("lq", [1, 4])
def test_decode_gpu(heads, lq, assert_close):
    from frugalserve.kernels.decode import paged_decode_attention

    hq, hkv = heads
    page, lens = 16, [lq, 100, 3000, 4097]
    max_pages = (max(lens) + page - 1) // page
    P = len(lens) * max_pages
    kc, vc = _rand(P, page, hkv, 128, seed=7), _rand(P, page, hkv, 128, seed=8)
    bt = torch.randperm(P, device="cuda").view(len(lens), max_pages).int()
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = _rand(len(lens), lq, hq, 128, seed=9)
    s = alibi_slopes(hq, device="cuda")
    for splits in (None, 1, 7):
        out = paged_decode_attention(q, kc, vc, bt, ctx, alibi_slopes=s, num_splits=splits)
        assert_close(out, paged_decode_reference(q, kc, vc, bt, ctx, alibi_slopes=s), BF)


def test_int32_overflow_offsets(assert_close):
    """Element offsets past 2^31: a varlen K/V of 17M tokens x 128 dims and a 4.3 GB paged cache."""
    from frugalserve.kernels.decode import paged_decode_attention
    from frugalserve.kernels.prefill import flash_attention_varlen

    T = (1 << 31) // 128 + 4096  # k_start * stride_t crosses 2^31 for the last sequence
    k = torch.empty(T, 1, 128, device="cuda", dtype=BF).normal_()
    v = torch.empty(T, 1, 128, device="cuda", dtype=BF).normal_()
    cu_k = torch.tensor([0, 1, T - 300, T], dtype=torch.int32, device="cuda")
    cu_q = torch.tensor([0, 1, 1, 101], dtype=torch.int32, device="cuda")
    q = _rand(101, 4, 128, seed=10)
    s = alibi_slopes(4, device="cuda")
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 100, alibi_slopes=s)
    ref = attention_reference(q[None, 1:], k[None, T - 300:], v[None, T - 300:], alibi_slopes=s)[0]
    assert_close(out[1:], ref, BF)
    del k, v
    torch.cuda.empty_cache()
    page, hkv = 16, 8
    P = (1 << 31) // (page * hkv * 128) + 64
    kc = torch.empty(P, page, hkv, 128, device="cuda", dtype=BF).normal_()
    vc = torch.empty(P, page, hkv, 128, device="cuda", dtype=BF).normal_()
    bt = torch.arange(P - 40, P, device="cuda", dtype=torch.int32).flip(0).view(1, 40)
    ctx = torch.tensor([600], dtype=torch.int32, device="cuda")
    qd = _rand(1, 1, 32, 128, seed=11)
    s = alibi_slopes(32, device="cuda")
    assert_close(paged_decode_attention(qd, kc, vc, bt, ctx, alibi_slopes=s, num_splits=3),
                 paged_decode_reference(qd, kc, vc, bt, ctx, alibi_slopes=s), BF)


@torch.no_grad()
def test_llama_on_kernels_gpu():
    from frugalserve.kernels import hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).cuda().half().eval()
    ids = torch.randint(0, 99, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert "triton kernels" in hf.enable_for_model(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("variant", ["gqa", "mqa"])
@torch.no_grad()
def test_falcon_on_kernels_gpu(variant, capsys):
    from frugalserve.kernels import hf
    from transformers import FalconConfig, FalconForCausalLM

    kw = dict(new_decoder_architecture=True, num_kv_heads=2) if variant == "gqa" else \
        dict(new_decoder_architecture=False, multi_query=True)
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=99, hidden_size=768, num_hidden_layers=2, num_attention_heads=12, alibi=True, **kw)
    ids = torch.randint(0, 99, (1, 700), device="cuda")
    model = FalconForCausalLM(cfg).cuda().eval()
    ref64 = None
    res = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        res[f"transformers-{impl}-bf16"] = model.bfloat16()(ids).logits[:, -1].double()
        model.float()
    hf.enable_for_model(model)
    res["frugalserve-bf16 (triton)"] = model.bfloat16()(ids).logits[:, -1].double()
    ref64 = model.double()(ids).logits[:, -1]  # float64 runs the reference path (kernels take bf16/fp16)
    dist = {k: (v - ref64).abs().max().item() for k, v in res.items()}
    with capsys.disabled():
        print(f"\nGPU falcon-{variant} ALiBi logits vs float64: " + ", ".join(f"{k}={v:.3e}" for k, v in dist.items()))
    assert dist["frugalserve-bf16 (triton)"] < 0.1
