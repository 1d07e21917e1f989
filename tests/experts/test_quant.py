"""bitsandbytes weights (int8, NF4), without Ray; LoRA adapters are test_adapters.py."""

from __future__ import annotations

import asyncio

import pytest
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.quant import linear_weight_bytes
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine
from frugalserve.experts.zoo import tasks as T

pytest.importorskip("bitsandbytes", reason="the quant extra is not installed")
TIER_M = resolve_model_path("builtin:tier-m")
PROMPTS = [t.prompt for t in T.generate("test", 60)]


def answers(engine, adapter=None):
    reqs = [GenerationRequest(messages=({"role": "user", "content": p},), adapter=adapter,
                              params=SamplingParams(max_tokens=12)) for p in PROMPTS]
    return [c.text for c in asyncio.run(engine.generate(reqs))]


@pytest.fixture(scope="module")
def full():
    return TransformersEngine.from_path(TIER_M, device="cpu", dtype="float32")


@pytest.mark.parametrize("kind, agree_at_least, size_at_most", [
    # measured on these 60 prompts: nf4 agrees with float32 on 56/60 answers (0.933), int8 on
    # 59/60 (0.983); the weight matrices take 0.26x and 0.50x of bf16's bytes
    ("nf4", 0.85, 0.30),
    ("int8", 0.93, 0.55),
])
def test_quantized_answers_stay_close(full, kind, agree_at_least, size_at_most):
    q = TransformersEngine.from_path(TIER_M, device="cpu", dtype="float32", quantization=kind)
    base, quant = answers(full), answers(q)
    agree = sum(a == b for a, b in zip(base, quant)) / len(base)
    assert agree >= agree_at_least, agree
    bf16_matrices = linear_weight_bytes(full.model) / 2  # float32 -> bfloat16
    assert linear_weight_bytes(q.model) <= size_at_most * bf16_matrices
    assert q.weight_bytes() < full.weight_bytes() / 2
    assert q.quantization == kind


def test_nf4_on_cpu_refuses_widths_bitsandbytes_cannot_pack():
    with pytest.raises(ValueError, match="multiples of 64"):  # tier-s: width 96
        TransformersEngine.from_path(resolve_model_path("builtin:tier-s"), device="cpu",
                                     quantization="nf4")
