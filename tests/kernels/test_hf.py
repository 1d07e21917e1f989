"""Model level: tiny Llama (GQA) and tiny Falcon (ALiBi + GQA/MQA) through frugalserve attention on CPU
(reference path, and the Triton kernels under the interpreter) against transformers' own paths."""

import importlib.util
import logging

import pytest
import torch
from frugalserve.kernels import hf

transformers = pytest.importorskip("transformers")
from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

FALCON_VARIANTS = {
    "gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mqa": dict(new_decoder_architecture=False, multi_query=True),
    "mha": dict(new_decoder_architecture=False, multi_query=False),
}


def _inputs(batch=2, seq=13, vocab=99, pad=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding, as in batched generation
    return ids, mask


def _llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return LlamaForCausalLM(cfg).eval()


def _falcon(variant, heads=4, hidden=128):
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                       alibi=True, **FALCON_VARIANTS[variant])
    return FalconForCausalLM(cfg).eval()


@torch.no_grad()
def test_llama_reference_path_matches_sdpa(model_atol, caplog):
    model = _llama()
    ids, mask = _inputs()
    ref = model(ids, attention_mask=mask).logits
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    caplog.set_level(logging.INFO, logger="frugalserve.kernels")
    assert "frugalserve" in hf.enable_for_model(model)
    out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=model_atol, rtol=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref_gen)


def test_registration_includes_mask_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = hf.register()
    assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
    assert hf.attn_implementation_for(LlamaConfig()) == name
    assert hf.attn_implementation_for(FalconConfig(alibi=True)) is None  # loaded as is, then patched


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@torch.no_grad()
def test_llama_kernel_path_interpreter(monkeypatch):
    """The Triton kernels inside a model (interpreter, float16): left-padded prefill and cached decode."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU test")
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", "triton")
    model = _llama().half()
    ids, mask = _inputs(seq=9)
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    hf.enable_for_model(model)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    for a, b in zip(gen.logits, ref_gen.logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=0)  # fp16 model, two summation orders


@pytest.mark.parametrize("variant", list(FALCON_VARIANTS))
@torch.no_grad()
def test_falcon_alibi_matches_transformers(variant, model_atol):
    model = _falcon(variant)
    ids, mask = _inputs()
    ref = {impl: None for impl in ("eager", "sdpa")}
    for impl in ref:
        model.set_attn_implementation(impl)
        ref[impl] = model(ids, attention_mask=mask).logits
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert "falcon ALiBi adapter on 2" in hf.enable_for_model(model)
    out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # 4 heads: slopes are powers of two and positions < 256, so Falcon's bf16 ALiBi tensor is exact here
    for impl, r in ref.items():
        torch.testing.assert_close(out[real], r[real], atol=model_atol, rtol=0, msg=impl)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref_gen)


@torch.no_grad()
def test_falcon_alibi_against_float64(capsys):
    """12 heads (slopes 2^-0.5, 2^-1.5, ... not exact in bfloat16), 300 tokens: our path vs a float64 run of
    the same math, and how far transformers' own eager/sdpa paths (ALiBi built in bfloat16) are from it."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (1, 300), generator=g)
    dist = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = _falcon("gqa", heads=12, hidden=384).to(dtype)
        for impl in ("eager", "sdpa"):
            m.set_attn_implementation(impl)
            dist[f"transformers-{impl}-{dtype}"] = m(ids).logits[:, -1].double()
        hf.enable_for_model(m)
        dist[f"frugalserve-{dtype}"] = m(ids).logits[:, -1].double()
    model = _falcon("gqa", heads=12, hidden=384)
    hf.enable_for_model(model)
    ref64 = model.double()(ids).logits[:, -1]
    dist = {k: (v - ref64).abs().max().item() for k, v in dist.items()}
    with capsys.disabled():
        print("\nfalcon ALiBi last-token logits, max |x - float64 reference|: "
              + ", ".join(f"{k}={v:.2e}" for k, v in dist.items()))
    assert dist["frugalserve-torch.float32"] < 1e-4
    assert dist["frugalserve-torch.float32"] <= dist["transformers-eager-torch.float32"] + 1e-6
    assert all(v == v for v in dist.values())


@torch.no_grad()
def test_falcon_alibi_float64_stays_near_transformers_eager():
    """The float64 reference above is our own adapter; bound it by transformers' own eager path
    in float64 as well, over every position. They differ only by transformers' ALiBi, built from
    bfloat16 slopes (measured 1.2e-2 on logits of magnitude ~1.3); a wrong adapter is far off
    (the slopes reversed: 0.24)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (1, 300), generator=g)
    eager = _falcon("gqa", heads=12, hidden=384).double()
    eager.set_attn_implementation("eager")
    theirs = eager(ids).logits[0]
    model = _falcon("gqa", heads=12, hidden=384)
    hf.enable_for_model(model)
    ours = model.double()(ids).logits[0]
    assert (ours - theirs).abs().max().item() < 0.03
    # and the gap is transformers' bfloat16 ALiBi: it shrinks to rounding once those slopes are
    # exact: 4 heads (powers of two) and positions < 256, where the paths agree to rounding
    ids4 = ids[:, :200]
    eager4 = _falcon("gqa").double()
    eager4.set_attn_implementation("eager")
    model4 = _falcon("gqa")
    hf.enable_for_model(model4)
    assert (model4.double()(ids4).logits - eager4(ids4).logits).abs().max().item() < 1e-7


def test_enable_reports_unsupported():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(n_layer=1, n_head=2, hidden_size=32, vocab_size=50))
    assert hf.enable_for_model(model).startswith("nothing enabled")


def test_enable_reports_what_runs(monkeypatch):
    """The report is dispatch.decide for the model's device, dtype and head layout, not triton's presence."""
    from frugalserve.kernels import dispatch

    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert "(reference path: device is cpu, the Triton kernels need CUDA)" in hf.enable_for_model(_llama())
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    text = hf.enable_for_model(_llama().half())  # hidden 128 / 4 heads: head_dim 32, 2 KV heads
    assert "(triton kernels: FRUGALSERVE_ATTENTION=triton; float16, head_dim 32, 4/2 heads supported)" in text
    assert "reference path: unsupported input: dtype torch.float32" in hf.enable_for_model(_llama())
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=144, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).half()
    assert "reference path: unsupported input: head_dim 36 is not supported" in hf.enable_for_model(odd)
    falcon = hf.enable_for_model(_falcon("mqa").half())  # 4 heads of 32, one KV head
    assert falcon.startswith("falcon ALiBi adapter on 2") and "head_dim 32, 4/1 heads supported" in falcon
    assert "4/2 heads" in hf.enable_for_model(_falcon("gqa").half())
    assert "4/4 heads" in hf.enable_for_model(_falcon("mha").half())


def test_report_without_head_fields():
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="custom")
    assert "head layout not read from the config" in hf.kernel_report(model)
