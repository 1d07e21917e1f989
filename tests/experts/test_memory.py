"""Memory per token: the config's analytic figure against the cache a real forward pass builds."""

from __future__ import annotations

import pytest
import torch
from frugalserve.experts.memory import (
    InsufficientMemoryError,
    TokenLedger,
    kv_shape,
    measure_kv_bytes_per_token,
    profile_model,
    weight_bytes,
)
from frugalserve.experts.spec import resolve_model_path

DEMOS = ["builtin:demo-llama", "builtin:demo-falcon"]


def load(name: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=dtype).eval()


@pytest.fixture(scope="module", params=DEMOS)
def model(request):
    return load(request.param)


def test_llama_gqa_analytic_equals_measured():
    m = load("builtin:demo-llama")
    shape = kv_shape(m.config)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, 2, 8)  # GQA: 8 q heads
    measured, method, _ = measure_kv_bytes_per_token(m)
    assert shape.bytes_per_token(4) == 256
    assert measured == pytest.approx(256, rel=0.02) and method == "cache-tensors"


def test_falcon_analytic_equals_measured_with_the_kv_heads_cached():
    """Falcon (new decoder architecture, 2 KV heads): with frugalserve's Falcon attention (what the
    engine runs on GPU) the cache holds the 2 KV heads, as the config says."""
    from frugalserve.kernels import hf

    m = load("builtin:demo-falcon")
    shape = kv_shape(m.config)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, 2, 8)
    hf.enable_for_model(m)
    measured, _, _ = measure_kv_bytes_per_token(m)
    assert measured == pytest.approx(shape.bytes_per_token(4), rel=0.02)


def test_stock_transformers_falcon_caches_kv_broadcast_to_every_head():
    """transformers' own Falcon attention broadcasts K/V to all query heads before caching: the
    profile measures that (4× here) and the autoscaler charges what is really held."""
    m = load("builtin:demo-falcon")
    p = profile_model(m, memory_budget_bytes=64 * 2**20)
    assert p.kv_bytes_per_token_analytic == 256
    assert p.kv_bytes_per_token_measured == pytest.approx(256 * 8 / 2, rel=0.02)
    assert p.kv_layout_factor == pytest.approx(4.0, rel=0.02)
    assert p.kv_bytes_per_token == p.kv_bytes_per_token_measured


def test_bfloat16_halves_kv(model):
    bf = model.to(torch.bfloat16)
    try:
        measured, _, _ = measure_kv_bytes_per_token(bf)
        assert measured == pytest.approx(profile_model(bf, measure=False).kv_bytes_per_token_analytic
                                         * (4 if bf.config.model_type == "falcon" else 1), rel=0.02)
    finally:
        model.to(torch.float32)


def test_kv_shape_of_config_dicts():
    assert kv_shape({"num_hidden_layers": 40, "num_attention_heads": 40, "hidden_size": 5120}) \
        .bytes_per_token(2) == 819_200  # Llama-2-13B: ~0.8 MB
    falcon7 = {"model_type": "falcon", "num_hidden_layers": 32, "num_attention_heads": 71,
               "hidden_size": 4544, "multi_query": True, "new_decoder_architecture": False}
    assert kv_shape(falcon7).num_kv_heads == 1
    falcon40 = dict(falcon7, new_decoder_architecture=True, num_kv_heads=8, num_attention_heads=128)
    assert kv_shape(falcon40).num_kv_heads == 8
    assert kv_shape(dict(falcon7, multi_query=False)).num_kv_heads == 71


def test_profile(model):
    budget = 4 * 2**20
    p = profile_model(model, memory_fraction=0.5, memory_budget_bytes=budget, name="m")
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    assert params <= p.weight_bytes == weight_bytes(model) < params + 4096  # tied embeddings once
    assert p.total_source == "budget" and p.usable_bytes == budget // 2 - p.weight_bytes
    assert p.token_capacity == int(p.usable_bytes // p.kv_bytes_per_token)
    assert p.activation_bytes_per_token > 0 and p.activation_method == "estimate"
    d = p.as_dict()
    assert d["weight_bytes"] == p.weight_bytes and d["kv_bytes_per_token"] == p.kv_bytes_per_token
    ram = profile_model(model, measure=False)
    assert ram.total_source == "ram" and ram.kv_measure_method == "not measured"


def test_profile_too_small_budget_names_the_numbers(model):
    with pytest.raises(InsufficientMemoryError, match="weights take .* bytes, more than"):
        profile_model(model, memory_budget_bytes=1000, measure=False, name="tiny")


def test_token_ledger():
    led = TokenLedger(kv_bytes_per_token=256, usable_bytes=256 * 100, activation_bytes_per_token=10)
    led.add("a", 10)
    led.add("b", 5)
    assert led.tokens_in_flight == 15 and led.bytes_in_use == 15 * 256  # queued: no activations
    led.start(["a"])
    for _ in range(3):
        led.advance("a")
    snap = led.snapshot()
    assert (snap["running_tokens"], snap["queued_tokens"], snap["running_requests"]) == (13, 5, 1)
    assert snap["bytes_in_use"] == 18 * 256 + 10
    led.release_if_queued("a")  # running: the batch still holds its cache
    led.release_if_queued("b")
    assert led.tokens_in_flight == 13
    stats = led.autoscaling_stats()
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["frugalserve_bytes_in_use"] == 13 * 256 + 10
    assert stats["frugalserve_usable_bytes"] == 25600.0
    led.release("a")
    assert led.tokens_in_flight == 0 and led.peak_tokens == 18
    with pytest.raises(ValueError, match="kv_bytes_per_token must be > 0, got 0"):
        TokenLedger(0)
