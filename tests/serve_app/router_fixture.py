"""Build a router artifact over the two demo experts from a real response matrix.

The demo models are untrained, so "correct" is a stand-in label computed from the answer; what
the tests check is that the live router makes the decisions the artifact prescribes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from frugalserve.cascade.calibrate import fit_router
from frugalserve.cascade.features import HashedPromptFeaturizer
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.cascade.policy import OperatingPoint
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import default_cost_per_1k, resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine

TIERS = ("demo-llama", "demo-falcon")
MAX_TOKENS = 6
PROMPTS = [f"{w} number {i}: what is {i} plus {2 * i}?" for i in range(40)
           for w in ("Question",)] + [f"Spell the word {w} backwards" for w in
                                       ("serve", "cheap", "model", "router", "token", "batch",
                                        "cache", "scale", "query", "tiers")] * 2


def label(answer: str) -> bool:
    return sum(map(ord, answer)) % 3 != 0


def engines() -> dict[str, TransformersEngine]:
    return {n: TransformersEngine.from_path(resolve_model_path(f"builtin:{n}"), device="cpu",
                                            dtype="float32", name=n) for n in TIERS}


def request(text: str) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},),
                             params=SamplingParams(max_tokens=MAX_TOKENS))


def build_demo_router(out: Path) -> Path:
    rows = []
    for name, eng in engines().items():
        per_1k = default_cost_per_1k(eng.num_parameters)
        outs = asyncio.run(eng.generate([request(p) for p in PROMPTS]))
        for i, (p, c) in enumerate(zip(PROMPTS, outs)):
            lps = list(c.token_logprobs)
            rows.append({"id": f"p{i}", "expert": name, "domain": "demo", "difficulty": 1,
                         "prompt": p, "answer": c.text, "correct": label(c.text),
                         "logprob_mean": float(np.mean(lps)), "logprob_min": min(lps),
                         "logprob_first": lps[0], "token_logprobs": lps,
                         "prompt_tokens": c.prompt_tokens,
                         "completion_tokens": c.completion_tokens,
                         "cost": (c.prompt_tokens + c.completion_tokens) * per_1k / 1000})
    m = ResponseMatrix.from_rows(rows)
    feat = HashedPromptFeaturizer()
    x = feat(m.prompts)
    result = fit_router(m, x, tiers=list(TIERS))
    art = result.to_artifact(feat.config(), meta={"tiers": list(TIERS)})
    # Serve a two-tier cascade whose threshold splits the calibration prompts in half, so both
    # "accept" and "escalate" happen in the tests.
    from frugalserve.cascade.evaluate import scores_for

    s0 = np.sort(scores_for(art, m, x)[:, 0])
    mid = len(s0) // 2
    art.cascade = OperatingPoint(TIERS, (float((s0[mid - 1] + s0[mid]) / 2),), 0.0,
                                 float(m.mean_cost().mean()))
    art.frontier = sorted({*art.frontier, art.cascade}, key=lambda p: p.cost)
    return art.save(out / "router")
