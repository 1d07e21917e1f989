"""The live application over real HTTP: httpx and the official openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine
from openai.types import Completion as OpenAICompletion
from transformers import AutoTokenizer

from tests.serve_app.test_api_fields import validate_chunk

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of Zorvia?"}]


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:demo-llama"))


@pytest.fixture(scope="module")
def local_engine():
    return TransformersEngine.from_path(resolve_model_path("builtin:demo-llama"), device="cpu",
                                        dtype="float32")


def prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_models_lists_every_expert(client):
    from tests.conftest import ALIASES

    models = {m.id: m.model_extra["frugalserve"]["kind"] for m in client.models.list().data}
    budgets = {m for m in models if m.startswith("cascade:budget=")}
    assert budgets and all(models[m] == "policy" for m in budgets)
    assert {m: k for m, k in models.items() if m not in budgets} == {
        "demo-llama": "expert", "demo-falcon": "expert", "hosted-falcon": "expert",
        "dead": "expert", "flaky": "expert", "demo-llama-lora": "expert", "moe": "policy",
        "cascade": "policy", **{a: "alias" for a in ALIASES}}


def test_chat_completion_matches_the_engine_and_counts_usage(client, tokenizer, local_engine):
    r = client.chat.completions.create(model="demo-llama", messages=MESSAGES, max_tokens=7,
                                       temperature=0)
    (direct,) = asyncio.run(local_engine.generate(
        [GenerationRequest(messages=tuple(MESSAGES), params=SamplingParams(max_tokens=7))]))
    assert r.choices[0].message.content == direct.text
    assert r.usage.prompt_tokens == prompt_len(tokenizer, MESSAGES)
    assert r.usage.completion_tokens == direct.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["frugalserve"]
    assert extra["experts"] == ["demo-llama"] and extra["cost"] > 0


def test_text_completion_with_logprobs(http, local_engine):
    r = http.post("/v1/completions", json={"model": "demo-llama", "prompt": "The capital of",
                                           "max_tokens": 5, "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    OpenAICompletion.model_validate(body)
    (direct,) = asyncio.run(local_engine.generate(
        [GenerationRequest(prompt="The capital of", params=SamplingParams(max_tokens=5))]))
    assert body["choices"][0]["text"] == direct.text
    assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        list(direct.token_logprobs), abs=1e-4)
    assert body["usage"]["completion_tokens"] == direct.completion_tokens
    assert body["frugalserve"]["answered_by"] == "demo-llama"


def test_max_tokens_and_stop_are_respected(client):
    free = client.chat.completions.create(model="demo-falcon", messages=MESSAGES, max_tokens=3,
                                          temperature=0)
    assert free.usage.completion_tokens <= 3
    longer = client.chat.completions.create(model="demo-falcon", messages=MESSAGES,
                                            max_tokens=12, temperature=0)
    text = longer.choices[0].message.content
    stop = text[3:5]
    cut = client.chat.completions.create(model="demo-falcon", messages=MESSAGES, max_tokens=12,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]


def test_streaming_chat_with_the_openai_client(client):
    whole = client.chat.completions.create(model="demo-llama", messages=MESSAGES, max_tokens=9,
                                           temperature=0)
    stream = client.chat.completions.create(model="demo-llama", messages=MESSAGES, max_tokens=9,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason


def test_streaming_completion_over_sse_ends_with_done(http):
    with http.stream("POST", "/v1/completions", json={
        "model": "demo-falcon", "prompt": "Once", "max_tokens": 6, "stream": True,
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for c in chunks:
        validate_chunk(c)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[-1]  # include_usage was not asked for
    assert chunks[-1]["frugalserve"]["answered_by"] == "demo-falcon"


def test_static_engine_batches_concurrent_requests_and_each_gets_its_own_answer(app_url,
                                                                               local_engine):
    # demo-llama serves a LoRA adapter, so it runs on the static-batch engine (Serve's batcher).
    from ray import serve

    handle = serve.get_deployment_handle("expert-demo-llama", app_name="frugalserve")
    assert handle.info.remote().result()["batching"] == "static"
    before = len(handle.stats.remote().result()["batch_sizes"])
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(16)]

    async def fire():
        async with httpx.AsyncClient(base_url=app_url, timeout=120) as c:
            return await asyncio.gather(*[
                c.post("/v1/chat/completions", json={
                    "model": "demo-llama", "max_tokens": 6, "temperature": 0,
                    "messages": [{"role": "user", "content": p}]}) for p in prompts])

    responses = asyncio.run(fire())
    sizes = handle.stats.remote().result()["batch_sizes"][before:]
    assert sum(sizes) == 16  # every request ran in exactly one engine call
    expected = asyncio.run(local_engine.generate([
        GenerationRequest(messages=({"role": "user", "content": p},),
                          params=SamplingParams(max_tokens=6)) for p in prompts]))
    for r, want in zip(responses, expected):
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == want.text


def test_continuous_batching_admits_newcomers_while_others_decode(app_url):
    # demo-falcon runs on the paged engine: a long request is streaming (mid-decode) when 15
    # more arrive one after another; they join its running batch, and each answer is its solo
    # answer.
    from ray import serve

    handle = serve.get_deployment_handle("expert-demo-falcon", app_name="frugalserve")
    assert handle.info.remote().result()["batching"] == "continuous"
    prompts = [f"Question number {i}: reverse the word batch{i}" for i in range(15)]

    def body(p, **kw):
        return {"model": "demo-falcon", "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": p}], **kw}

    with httpx.Client(base_url=app_url, timeout=120) as c:
        solo = [c.post("/v1/chat/completions", json=body(p)).json() for p in prompts]
    before = handle.stats.remote().result()

    async def fire():
        async with httpx.AsyncClient(base_url=app_url, timeout=120) as c:
            long_body = body("a long story", max_tokens=90, ignore_eos=True, stream=True)
            async with c.stream("POST", "/v1/chat/completions", json=long_body) as s:
                lines = s.aiter_lines()
                while '"content":"' not in (await lines.__anext__()):
                    pass  # the long request is decoding now

                async def late(i, p):
                    await asyncio.sleep(0.01 * i)
                    return await c.post("/v1/chat/completions", json=body(p))

                answers = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
                rest = [line async for line in lines]
            return answers, rest

    answers, rest = asyncio.run(fire())
    after = handle.stats.remote().result()
    assert [line for line in rest if line][-1] == "data: [DONE]"
    assert after["mixed_steps"] > before["mixed_steps"], "no newcomer joined a decoding batch"
    assert after["max_running_batch"] > 1
    for r, want in zip(answers, solo):
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == \
            want["choices"][0]["message"]["content"]


def test_default_model_alias(http):
    r = http.post("/v1/chat/completions", json={"model": "default", "messages": MESSAGES,
                                                "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "demo-llama"


def test_health(http):
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_lora_adapter_is_an_expert_served_by_its_base(http, client):
    lora = next(m for m in client.models.list().data if m.id == "demo-llama-lora")
    assert lora.model_extra["frugalserve"]["adapter_of"] == "demo-llama"
    prompts = [f"adapter question {i}" for i in range(6)]
    differs = 0
    for p in prompts:
        body = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": p}]}
        a = http.post("/v1/chat/completions", json={"model": "demo-llama-lora", **body}).json()
        b = http.post("/v1/chat/completions", json={"model": "demo-llama", **body}).json()
        assert a["frugalserve"]["answered_by"] == "demo-llama-lora"
        differs += a["choices"][0]["message"]["content"] != b["choices"][0]["message"]["content"]
    assert differs >= 5
