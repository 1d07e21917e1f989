"""The paged engine on CPU with real models: the same greedy answers as the static engine (the
engine the project served before it), batched or alone, staggered, chunked, preempted; its
forward equals transformers' own on every family it claims; sampling, stops and cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.paged.engine import PagedConfig, PagedEngine
from frugalserve.experts.paged.models import UnsupportedModel, paged_model_for
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine

PROMPTS = ["What is 12 + 30?", "Reverse the word serve.", "What is the capital of Zorvia?",
           "Sort the letters of frugal.", "What is 4821 + 77?", "x" * 40, "Who founded Velandor?",
           "Spell paged backwards.", "What is 7 * 8?", "hi"]


def chat(text: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},),
                             params=SamplingParams(**params), request_id=f"r-{text[:12]}")


def paged(name: str, **config) -> PagedEngine:
    config.setdefault("max_num_seqs", 16)
    return PagedEngine.from_path(resolve_model_path(f"builtin:{name}"), device="cpu",
                                 dtype="float32", config=PagedConfig(**config))


@pytest.fixture(scope="module", params=["tier-s", "expert-text"], ids=["llama-gqa", "falcon-alibi"])
def pair(request):
    static = TransformersEngine.from_path(resolve_model_path(f"builtin:{request.param}"),
                                          device="cpu", dtype="float32")
    engine = paged(request.param)
    yield request.param, static, engine
    engine.close()


def ids(completions) -> list[tuple[int, ...]]:
    return [c.token_ids for c in completions]


def test_paged_greedy_equals_the_static_engine(pair):
    _, static, engine = pair
    reqs = [chat(p, max_tokens=16) for p in PROMPTS]
    want = asyncio.run(static.generate(reqs))
    got = asyncio.run(engine.generate(reqs))
    assert ids(got) == ids(want)
    assert [c.text for c in got] == [c.text for c in want]
    for a, b in zip(got, want):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.finish_reason == b.finish_reason and a.prompt_tokens == b.prompt_tokens


def test_staggered_arrivals_answer_as_alone(pair):
    _, _, engine = pair
    reqs = [chat(p, max_tokens=20, ignore_eos=True) for p in PROMPTS]
    alone = [asyncio.run(engine.generate([r]))[0] for r in reqs]
    before = engine.stats()

    async def staggered():
        async def one(i, r):
            await asyncio.sleep(0.004 * i)  # arrive while the earlier ones decode
            return (await engine.generate([r]))[0]
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))

    together = asyncio.run(staggered())
    assert ids(together) == ids(alone)
    assert engine.stats()["max_running_batch"] > 1
    assert engine.stats()["steps"] > before["steps"]


def test_chunked_prefill_and_preemption_keep_the_answers(pair):
    name, _, engine = pair
    reqs = [chat(p * 3, max_tokens=24, ignore_eos=True) for p in PROMPTS]
    want = asyncio.run(engine.generate(reqs))
    # 8 tokens a step: every prompt is prefilled in several chunks; 40 pages of 4 tokens
    # cannot hold ten growing sequences at once: some are preempted and recomputed.
    tight = PagedEngine(engine.model, engine.tokenizer, name=name, config=PagedConfig(
        max_num_seqs=10, max_num_batched_tokens=8, page_size=4, memory_fraction=1.0,
        memory_budget_bytes=engine._weights + 41 * engine.runner.page_bytes(engine.paged, 4)))
    try:
        assert tight.blocks.num_usable == 40
        got = asyncio.run(tight.generate(reqs))
        stats = tight.stats()
    finally:
        tight.close()
    assert stats["preemptions"] > 0
    assert ids(got) == ids(want)
    assert stats["pages_used"] == 0


def test_min_tokens_and_ignore_eos(pair):
    _, static, engine = pair
    short = next(c for c in asyncio.run(engine.generate([chat(p, max_tokens=30) for p in PROMPTS]))
                 if c.finish_reason == "stop" and c.completion_tokens < 10)
    prompt = PROMPTS[[c.token_ids for c in asyncio.run(engine.generate(
        [chat(p, max_tokens=30) for p in PROMPTS]))].index(short.token_ids)]
    (forced,) = asyncio.run(engine.generate([chat(prompt, max_tokens=30, ignore_eos=True)]))
    assert forced.completion_tokens == 30 and forced.finish_reason == "length"
    assert forced.token_ids[:short.completion_tokens - 1] == short.token_ids[:-1]
    (held,) = asyncio.run(engine.generate([chat(prompt, max_tokens=30, min_tokens=15)]))
    assert held.completion_tokens >= 15
    assert not set(held.token_ids[:15]) & set(engine.eos_ids)
    (same,) = asyncio.run(static.generate([chat(prompt, max_tokens=30, min_tokens=15)]))
    assert same.token_ids == held.token_ids


def test_seeded_sampling_does_not_depend_on_the_batch(pair):
    _, _, engine = pair
    # temperature 2 over 12 tokens: the zoo is too sure of itself at 1 for two seeds to differ
    req = chat("Tell me a story.", max_tokens=12, temperature=2.0, seed=7, ignore_eos=True)
    (a,) = asyncio.run(engine.generate([req]))
    b = asyncio.run(engine.generate([chat("other", max_tokens=5), req, chat("more", max_tokens=9)]))[1]
    assert a.token_ids == b.token_ids
    (c,) = asyncio.run(engine.generate([chat("Tell me a story.", max_tokens=12, temperature=2.0, seed=8, ignore_eos=True)]))
    assert c.token_ids != a.token_ids


def test_a_stop_sequence_cuts_and_frees_the_pages(pair):
    _, static, engine = pair
    (free,) = asyncio.run(engine.generate([chat("Sort the letters of frugal.", max_tokens=20,
                                                ignore_eos=True)]))
    stop = free.text[3:5]
    req = chat("Sort the letters of frugal.", max_tokens=20, ignore_eos=True, stop=(stop,))
    (cut,) = asyncio.run(engine.generate([req]))
    (want,) = asyncio.run(static.generate([req]))
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    assert cut.token_ids == want.token_ids and cut.text == want.text
    wait_until(lambda: engine.stats()["pages_used"] == 0)


def test_a_consumer_that_leaves_frees_its_pages_at_once(pair):
    _, _, engine = pair

    async def leave_early():
        stream = engine.stream(engine.admit(chat("a long story", max_tokens=200, ignore_eos=True)))
        await stream.__anext__()
        await stream.aclose()

    cancelled = engine.stats()["cancelled"]
    asyncio.run(leave_early())
    wait_until(lambda: engine.stats()["pages_used"] == 0 and engine.stats()["running"] == 0)
    assert engine.stats()["cancelled"] == cancelled + 1


def test_info_says_what_runs(pair):
    _, _, engine = pair
    info = engine.info()
    assert info.batching == "continuous"
    assert info.attention["decode"].startswith("reference (") and "cpu" in info.attention["decode"]
    assert info.attention["cuda_graphs"] == "off"
    profile = engine.memory_profile()
    assert profile.kv_measure_method == "paged-cache"
    assert profile.token_capacity == engine.blocks.num_usable * engine.blocks.page_size


def wait_until(cond, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- every family the paged forward claims, against transformers' own forward ---------------

def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  max_position_embeddings=128)
    if kind == "falcon-alibi-gqa":
        return tf.FalconConfig(**common, num_kv_heads=2, new_decoder_architecture=True, alibi=True)
    if kind == "falcon-rotary-mqa":
        return tf.FalconConfig(**common, multi_query=True, new_decoder_architecture=False,
                               parallel_attn=True, alibi=False)
    if kind == "falcon-rotary-mha-sequential":
        return tf.FalconConfig(**common, multi_query=False, new_decoder_architecture=False,
                               parallel_attn=False, alibi=False)
    llama = dict(common, intermediate_size=96, num_key_value_heads=2)
    if kind == "llama":
        return tf.LlamaConfig(**llama)
    if kind == "mistral":
        return tf.MistralConfig(**llama, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama, use_sliding_window=False)
    if kind == "qwen3":
        return tf.Qwen3Config(**llama, head_dim=8, use_sliding_window=False)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "falcon-alibi-gqa",
                                  "falcon-rotary-mqa", "falcon-rotary-mha-sequential"])
def test_paged_forward_equals_transformers(kind):
    from frugalserve.experts.paged.block_manager import BlockManager
    from frugalserve.experts.paged.runner import ModelRunner
    from frugalserve.experts.paged.scheduler import Scheduled, Step
    from frugalserve.experts.paged.sequence import Sequence
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(kind)).eval()
    pm = paged_model_for(model, 128)
    blocks = BlockManager(64, 4)
    runner = ModelRunner(pm, blocks, max_num_seqs=4, max_context=128, eos_ids=frozenset({0}))
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 1, 14]
    seqs = [Sequence(i, torch.randint(1, 97, (n,), generator=gen).tolist(), n, 4)
            for i, n in enumerate(lengths)]
    for s in seqs:
        blocks.allocate(s, len(s.tokens))
    # prefill all three in one packed step, then one decode step for each with a new token
    logits = runner._eager(Step(prefills=[Scheduled(s, 0, len(s.tokens), True) for s in seqs]))
    for s in seqs:
        s.num_computed = len(s.tokens)
        s.tokens.append(int(torch.randint(1, 97, (1,), generator=gen)))
        blocks.allocate(s, 1)
    step_logits = runner._eager(Step(decodes=[Scheduled(s, s.num_computed, 1, True) for s in seqs]))
    with torch.no_grad():
        for i, s in enumerate(seqs):
            full = model(torch.tensor([s.tokens])).logits[0]
            torch.testing.assert_close(logits[i], full[-2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step_logits[i], full[-1], atol=1e-4, rtol=1e-4)


def test_models_without_a_paged_forward_say_why():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        paged_model_for(gpt2, 64)
    windowed = AutoModelForCausalLM.from_config(tf.MistralConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, sliding_window=16))
    with pytest.raises(UnsupportedModel, match="sliding window"):
        paged_model_for(windowed, 64)


def test_the_loader_falls_back_to_static_batches_with_the_reason(demo_adapter):
    from frugalserve.experts.loader import build_engine
    from frugalserve.experts.spec import EngineSpec

    spec = EngineSpec(model="builtin:demo-llama", device="cpu", adapters={"lora": str(demo_adapter)})
    engine = build_engine(spec, name="d")
    assert engine.info().batching == "static"
    assert "LoRA" in engine.info().details["static_batching_reason"]
    with pytest.raises(ValueError, match="continuous is 'on'"):
        build_engine(spec.model_copy(update={"scheduler": spec.scheduler.model_copy(
            update={"continuous": "on"})}), name="d")
    plain = build_engine(EngineSpec(model="builtin:demo-llama", device="cpu"), name="p")
    assert plain.info().batching == "continuous"
    plain.close()
