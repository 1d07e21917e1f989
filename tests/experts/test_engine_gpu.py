"""The transformers engine on a GPU: frugalserve's kernels give the answers transformers' own
attention gives (bf16), for Llama (GQA) and Falcon (ALiBi) models, batched with left padding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from frugalserve.experts.engine import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu
MODELS = Path(__file__).resolve().parents[2] / "experts" / "zoo" / "models"  # no pydantic on GPU images
PROMPTS = ["What is 12 + 30?", "Reverse the word serve.", "What is the capital of Zorvia?",
           "x" * 50, "Sort the letters of frugal."]


@pytest.mark.parametrize("name", ["tier-m", "expert-facts", "demo-falcon", "demo-llama"])
def test_kernels_match_transformers_attention(name):
    from frugalserve.experts.transformers_engine import TransformersEngine

    path = MODELS / name
    assert (path / "config.json").is_file(), f"{name} is not in this checkout"
    reqs = [GenerationRequest(messages=({"role": "user", "content": p},),
                              params=SamplingParams(max_tokens=12)) for p in PROMPTS]
    base = TransformersEngine.from_path(path, device="cuda", dtype="bfloat16", use_kernels=False)
    ours = TransformersEngine.from_path(path, device="cuda", dtype="bfloat16", use_kernels=True)
    assert "triton" in ours.info().attention["attention"], ours.info().attention
    a = asyncio.run(base.generate(reqs))
    b = asyncio.run(ours.generate(reqs))
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    assert same >= len(reqs) - 1, [(x.text, y.text) for x, y in zip(a, b)]
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x.token_ids), len(y.token_ids)) and x.token_ids[n] == y.token_ids[n]:
            n += 1
        for u, v in zip(x.token_logprobs[:n], y.token_logprobs[:n]):
            assert abs(u - v) < 0.1  # bf16 end to end
