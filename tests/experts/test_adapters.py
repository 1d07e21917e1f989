"""LoRA adapters on a shared base (peft), without Ray. They need peft, not bitsandbytes."""

from __future__ import annotations

import asyncio

import pytest
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine
from frugalserve.experts.zoo import tasks as T

from tests.conftest import make_random_adapter

pytest.importorskip("peft", reason="the quant extra (peft) is not installed")
TIER_M = resolve_model_path("builtin:tier-m")
PROMPTS = [t.prompt for t in T.generate("test", 8)]


def answers(engine, adapter=None):
    reqs = [GenerationRequest(messages=({"role": "user", "content": p},), adapter=adapter,
                              params=SamplingParams(max_tokens=12)) for p in PROMPTS]
    return [c.text for c in asyncio.run(engine.generate(reqs))]


def test_adapter_changes_answers_and_mixed_batches_match_single_calls(tmp_path):
    base = resolve_model_path("builtin:demo-llama")
    adapter = make_random_adapter(base, tmp_path / "a")
    eng = TransformersEngine.from_path(base, device="cpu", dtype="float32",
                                       adapters={"lora-a": adapter})
    plain = TransformersEngine.from_path(base, device="cpu", dtype="float32")
    with_adapter, without = answers(eng, "lora-a")[:8], answers(eng)[:8]
    assert without == answers(plain)[:8]  # the base rows are untouched by the adapter
    assert sum(a != b for a, b in zip(with_adapter, without)) >= 6
    mixed = [GenerationRequest(messages=({"role": "user", "content": p},), params=SamplingParams(
        max_tokens=12), adapter="lora-a" if i % 2 else None) for i, p in enumerate(PROMPTS[:8])]
    out = [c.text for c in asyncio.run(eng.generate(mixed))]
    assert out == [with_adapter[i] if i % 2 else without[i] for i in range(8)]
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        asyncio.run(eng.generate([GenerationRequest(prompt="x", adapter="nope")]))


def test_adapter_errors_name_the_problem(tmp_path):
    base = resolve_model_path("builtin:demo-llama")
    with pytest.raises(FileNotFoundError, match="adapter 'gone'"):
        TransformersEngine.from_path(base, device="cpu", adapters={"gone": tmp_path / "nowhere"})
    other = make_random_adapter(resolve_model_path("builtin:demo-falcon").parent / "demo-llama",
                                tmp_path / "for-llama")
    with pytest.raises(ValueError, match="trained on base 'demo-llama', not on 'tier-m'"):
        TransformersEngine.from_path(TIER_M, device="cpu", adapters={"wrong": other})
