"""Both transformers engines without Ray — the plain static-batch engine and the continuous-
batching paged engine — on the same contract: logprobs, batching, stops, limits, seeds."""

from __future__ import annotations

import asyncio

import pytest
import torch
from frugalserve.experts.engine import GenerationRequest, PromptTooLongError, SamplingParams
from frugalserve.experts.paged.engine import PagedConfig, PagedEngine
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine

MODELS = ["demo-llama", "demo-falcon"]
ENGINES = ["static", "paged"]


def load(kind: str, name: str, **kwargs):
    path = resolve_model_path(f"builtin:{name}")
    if kind == "static":
        return TransformersEngine.from_path(path, device="cpu", dtype="float32", **kwargs)
    return PagedEngine.from_path(path, device="cpu", dtype="float32",
                                 config=PagedConfig(max_num_seqs=8, page_size=4), **kwargs)


@pytest.fixture(scope="module", params=[(k, m) for k in ENGINES for m in MODELS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def engine(request):
    engine = load(*request.param)
    yield engine
    if hasattr(engine, "close"):
        engine.close()


def run(engine, requests):
    return asyncio.run(engine.generate(requests))


def chat(text: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},),
                             params=SamplingParams(**params))


def test_logprobs_equal_a_manual_forward_pass(engine):
    req = chat("What is the capital of Zorvia?", max_tokens=6)
    (c,) = run(engine, [req])
    ids = engine.encode(req) + list(c.token_ids)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(engine.encode(req))
    manual = [logp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    assert c.token_logprobs == pytest.approx(manual, abs=1e-4)
    # greedy: every chosen token is the argmax of its step
    assert all(logp[n - 1 + i].argmax().item() == t for i, t in enumerate(c.token_ids))


def test_left_padding_keeps_greedy_outputs(engine):
    prompts = ["hi", "What is 12 + 30? Think step by step and answer.", "Reverse serve", "x" * 40]
    batch = run(engine, [chat(p, max_tokens=8) for p in prompts])
    for p, together in zip(prompts, batch):
        (alone,) = run(engine, [chat(p, max_tokens=8)])
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert together.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


def test_per_request_max_tokens_and_usage(engine):
    reqs = [chat("hello", max_tokens=n) for n in (1, 3, 7)]
    out = run(engine, reqs)
    for req, c in zip(reqs, out):
        assert c.completion_tokens <= req.params.max_tokens
        assert len(c.token_ids) == len(c.token_logprobs) == c.completion_tokens
        assert c.prompt_tokens == len(engine.encode(req))
        if c.finish_reason == "length":
            assert c.completion_tokens == req.params.max_tokens


def test_stop_sequence_cuts_the_text(engine):
    (free,) = run(engine, [chat("hello there", max_tokens=12)])
    assert len(free.text) >= 3, "need some text to pick a stop sequence from"
    stop = free.text[2:4]
    (stopped,) = run(engine, [chat("hello there", max_tokens=12, stop=(stop,))])
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.text == free.text[: free.text.find(stop)]


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    req = chat("tell me", max_tokens=8, temperature=1.0, seed=7)
    (a,) = run(engine, [req])
    b = run(engine, [chat("other", max_tokens=3), req])[1]
    assert a.token_ids == b.token_ids
    other_seed = run(engine, [chat("tell me", max_tokens=8, temperature=1.0, seed=8)])[0]
    assert other_seed.token_ids != a.token_ids


def test_top_p_tiny_is_greedy(engine):
    (greedy,) = run(engine, [chat("abc", max_tokens=6)])
    (nucleus,) = run(engine, [chat("abc", max_tokens=6, temperature=1.0, top_p=1e-6, seed=1)])
    assert nucleus.token_ids == greedy.token_ids


def test_streaming_pieces_add_up_to_the_completion(engine):
    async def collect():
        pieces, final = [], None
        async for d in engine.stream(engine.admit(chat("stream me", max_tokens=10))):
            pieces.append(d.text)
            final = d.completion or final
        return pieces, final

    pieces, final = asyncio.run(collect())
    assert "".join(pieces) == final.text
    assert len(pieces) >= 2


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(PromptTooLongError, match="maximum context length"):
        run(engine, [chat("word " * 2000, max_tokens=4)])
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        run(engine, [chat("hi", max_tokens=engine.max_context)])


def test_default_max_tokens_is_capped_by_the_context(engine):
    (c,) = run(engine, [chat("hi", max_tokens=None)])
    assert c.completion_tokens <= engine.default_max_tokens


@pytest.mark.parametrize("cls", [TransformersEngine, PagedEngine])
def test_missing_model_folder_is_a_clear_error(tmp_path, cls):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cls.from_path(tmp_path / "nope")
