"""vLLM's and OpenAI's request fields over real HTTP, on both transformers engines (demo-llama
serves LoRA adapters, so it runs static batches; demo-falcon runs the paged engine) and through a
remote expert; every body and chunk validated with the openai package's own types."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from frugalserve.experts.spec import resolve_model_path
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow

ENGINES = ["demo-llama", "demo-falcon"]  # static, paged
MESSAGES = [{"role": "user", "content": "Name a city."}]


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)


def validate_chunk(c: dict) -> None:
    """A streamed chunk against openai's type. Text completions have no streamed type of their
    own (the SDK reads chunks as `Completion`, unvalidated): a chunk before the last has a null
    `finish_reason`, as vLLM's and OpenAI's have, which `Completion` does not allow."""
    if c["object"] == "chat.completion.chunk":
        ChatCompletionChunk.model_validate(c)
        return
    choices = [{**ch, "finish_reason": ch["finish_reason"] or "length"} for ch in c["choices"]]
    OpenAICompletion.model_validate({**c, "choices": choices})


def chat(http, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    return r.json()


def events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize("model", ENGINES)
def test_top_k_1_is_greedy(http, model):
    greedy = chat(http, model=model, temperature=0)["choices"][0]["message"]["content"]
    for seed in (1, 2):
        top1 = chat(http, model=model, temperature=1.5, top_k=1, seed=seed)
        assert top1["choices"][0]["message"]["content"] == greedy


@pytest.mark.parametrize("model", ENGINES)
def test_min_tokens_holds_and_ignore_eos_runs_to_max_tokens(http, model):
    held = chat(http, model=model, temperature=0, min_tokens=6, max_tokens=6)
    assert held["usage"]["completion_tokens"] == 6
    run = chat(http, model=model, temperature=0, ignore_eos=True, max_tokens=12)
    assert run["usage"]["completion_tokens"] == 12
    assert run["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("model", ENGINES)
def test_logit_bias_bans_a_token(http, model):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(f"builtin:{model}"))
    first = chat(http, model=model, temperature=0, logprobs=True)
    banned = first["choices"][0]["logprobs"]["content"][0]["token"]
    (token_id,) = [i for i in range(len(tok)) if tok.decode([i]) == banned][:1]
    biased = chat(http, model=model, temperature=0, logprobs=True,
                  logit_bias={str(token_id): -100})
    assert biased["choices"][0]["logprobs"]["content"][0]["token"] != banned


@pytest.mark.parametrize("model", ENGINES)
def test_n_3_gives_3_choices_that_count_in_usage(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=6,
                                       temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # copies of one prompt, each its own seed (seed + index)
    again = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=6,
                                           temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == texts
    one = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6,
                                         temperature=1.0, seed=11)
    assert one.choices[0].message.content == texts[0]
    assert r.usage.completion_tokens > one.usage.completion_tokens  # every choice counts


@pytest.mark.parametrize("model", ENGINES)
def test_n_streams_every_choice(http, model):
    chunks = events(http, "/v1/chat/completions", {
        "model": model, "messages": MESSAGES, "max_tokens": 5, "n": 2, "temperature": 1.0,
        "seed": 5, "stream": True, "stream_options": {"include_usage": True}})
    for c in chunks:
        validate_chunk(c)
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finished == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("model", ENGINES)
def test_top_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4,
                                       logprobs=True, top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the token chosen is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


@pytest.mark.parametrize("model", ENGINES)
def test_json_schema_output_parses_and_validates(client, model):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=24, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                         temperature=0, response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    assert text.startswith("{")  # an object, never another JSON value
    if obj.choices[0].finish_reason == "stop":  # an untrained model may run out of tokens first
        assert isinstance(json.loads(text), dict)


def test_penalties_and_min_p_are_honoured(http):
    plain = chat(http, model="demo-falcon", temperature=0, max_tokens=16, ignore_eos=True)
    ids = plain["choices"][0]["message"]["content"]
    penalized = chat(http, model="demo-falcon", temperature=0, max_tokens=16, ignore_eos=True,
                     repetition_penalty=5.0, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized["choices"][0]["message"]["content"] != ids
    assert chat(http, model="demo-falcon", temperature=1.0, min_p=0.99, seed=3, max_tokens=6)[
        "choices"][0]["message"]["content"] == chat(http, model="demo-falcon", temperature=0,
                                                    max_tokens=6)["choices"][0]["message"]["content"]


def test_stop_token_ids_end_the_answer(http):
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:demo-falcon"))
    run = chat(http, model="demo-falcon", temperature=0, ignore_eos=True, max_tokens=10,
               logprobs=True)
    third = run["choices"][0]["logprobs"]["content"][2]["token"]
    (token_id,) = [i for i in range(len(tok)) if tok.decode([i]) == third][:1]
    cut = chat(http, model="demo-falcon", temperature=0, ignore_eos=True, max_tokens=10,
               stop_token_ids=[token_id])
    assert cut["usage"]["completion_tokens"] <= 3 and cut["choices"][0]["finish_reason"] == "stop"


def test_text_completion_fields(http):
    r = http.post("/v1/completions", json={"model": "demo-falcon", "prompt": "Once", "n": 2,
                                           "max_tokens": 4, "logprobs": 2, "temperature": 0.8,
                                           "seed": 1})
    assert r.status_code == 200, r.text
    body = OpenAICompletion.model_validate(r.json())
    assert len(body.choices) == 2
    # {text: logprob}: two alternatives that decode to the same text share a key
    assert all(1 <= len(top) <= 2 for c in body.choices for top in c.logprobs.top_logprobs)


# -- what other clients send --------------------------------------------------------------------

LITELLM = {  # litellm.completion(model="openai/demo-llama", api_base=..., stream=True, ...)
    "model": "demo-llama", "messages": [{"role": "user", "content": "hi"}], "stream": True,
    "stream_options": {"include_usage": True}, "max_tokens": 4, "temperature": 0.2, "top_p": 0.9,
    "user": "u-1", "extra_headers": None, "metadata": {"litellm": True}, "n": 1,
}
VLLM_BENCH_CHAT = {  # vllm bench serve --backend openai-chat
    "model": "demo-falcon", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "temperature": 0.0, "max_completion_tokens": 4, "stream": True,
    "stream_options": {"include_usage": True}, "ignore_eos": True,
}
VLLM_BENCH_COMPLETIONS = {  # vllm bench serve --backend openai
    "model": "demo-falcon", "prompt": "hello there", "repetition_penalty": 1.0, "temperature": 0.0,
    "max_tokens": 4, "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
    "ignore_eos": True,
}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", LITELLM), ("/v1/chat/completions", VLLM_BENCH_CHAT),
    ("/v1/completions", VLLM_BENCH_COMPLETIONS)])
def test_bodies_other_clients_send(http, path, body):
    chunks = events(http, path, body)
    for c in chunks:
        validate_chunk(c)
    assert 0 < chunks[-1]["usage"]["completion_tokens"] <= 4


LOCUST_BODIES = """
import locust  # first: it patches the process (gevent) at import
import json, random, sys
from types import SimpleNamespace
from frugalserve.cluster.load.locustfile import ChatUser
user = SimpleNamespace(rng=random.Random(0), max_tokens=2, budget=0.5)
print(json.dumps([ChatUser.body(user, m, s) for m, s in
                  (("demo-llama", False), ("cascade", False), ("demo-falcon", True))]))
"""


def test_the_locust_file_bodies_are_accepted(http):
    import subprocess
    import sys

    # in a process of its own: importing locust patches this one's threads and sockets (gevent)
    out = subprocess.run([sys.executable, "-c", LOCUST_BODIES], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    for body in json.loads(out.strip().splitlines()[-1]):
        stream = body["stream"]
        if stream:
            assert events(http, "/v1/chat/completions", body)[-1]["usage"]["completion_tokens"] <= 2
        else:
            ChatCompletion.model_validate(http.post("/v1/chat/completions", json=body).json())


# -- endpoints, headers, names --------------------------------------------------------------


def test_request_id_is_echoed_and_names_the_completion(http):
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "trace-42"},
                  json={"model": "demo-llama", "messages": MESSAGES, "max_tokens": 2})
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "chatcmpl-trace-42"
    made = http.post("/v1/chat/completions", json={"model": "demo-llama", "messages": MESSAGES,
                                                    "max_tokens": 2})
    assert made.json()["id"] == f"chatcmpl-{made.headers['x-request-id']}"
    err = http.post("/v1/chat/completions", headers={"X-Request-Id": "bad-1"}, json={"model": "x"})
    assert err.status_code == 400 and err.headers["x-request-id"] == "bad-1"


def test_routing_result_in_headers(http):
    r = http.post("/v1/chat/completions", json={"model": "cascade", "messages": MESSAGES,
                                                 "max_tokens": 4, "temperature": 0})
    rec = r.json()["frugalserve"]
    assert r.headers["x-frugalserve-expert"] == rec["answered_by"]
    assert float(r.headers["x-frugalserve-cost"]) == pytest.approx(rec["cost"])
    assert int(r.headers["x-frugalserve-escalations"]) == rec["escalations"]
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "demo-falcon", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as s:
        assert s.headers["x-frugalserve-expert"] == "demo-falcon"
        assert s.headers["x-frugalserve-escalations"] == "0"


def test_model_by_id_health_and_metrics_on_the_api_port(http):
    one = http.get("/v1/models/demo-falcon")
    assert one.status_code == 200 and one.json()["id"] == "demo-falcon"
    assert http.get("/v1/models/cascade").json()["frugalserve"]["kind"] == "policy"
    missing = http.get("/v1/models/nope").json()["error"]
    assert (missing["param"], missing["code"]) == ("model", "model_not_found")
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json={"model": "demo-falcon", "messages": MESSAGES,
                                                    "max_tokens": 2}).status_code == 200
    text = http.get("/metrics").text
    assert "# TYPE ray_frugalserve_requests_total counter" in text or "ray_frugalserve_" in text
    assert "ray_serve_" in text


def test_aliases_and_options_in_the_model_name_route_as_documented(http):
    alias = chat(http, model="gpt-4o-mini", temperature=0)
    assert alias["frugalserve"]["policy"] == "cascade"
    direct = chat(http, model="gpt-4o", temperature=0)
    assert direct["frugalserve"]["policy"] == "direct" and direct["model"] == "demo-falcon"
    first_tier = chat(http, model="cheap", temperature=0)  # cascade:max_tier=0
    assert first_tier["frugalserve"]["experts"] == ["demo-llama"]
    started = chat(http, model="cascade:start_tier=1", temperature=0)
    assert started["frugalserve"]["experts"] == ["demo-falcon"]
    assert started["frugalserve"]["start_tier"] == 1
    budget = chat(http, model="cascade:budget=1000")
    assert budget["frugalserve"]["budget"] == 1000
    # the body's options win over the name's
    forced = chat(http, model="cascade:max_tier=0", frugalserve={"max_tier": 1, "start_tier": 1})
    assert forced["frugalserve"]["experts"] == ["demo-falcon"]
    listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
    cheapest = next(m for m in listed if m.startswith("cascade:budget="))
    assert chat(http, model=cheapest)["frugalserve"]["policy"] == "cascade"


# -- remote experts -----------------------------------------------------------------------------


def test_a_rate_limited_remote_is_retried_after_its_retry_after(http, stub_provider):
    before = len(stub_provider.calls)
    messages = [{"role": "user", "content": "retry me"}]
    r = http.post("/v1/chat/completions", json={"model": "flaky", "messages": messages,
                                                 "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "stub answer"
    calls = stub_provider.calls[before:]
    assert len(calls) == 2  # the 429, then the retry
    assert calls[1]["max_completion_tokens"] == 5 and "max_tokens" not in calls[1]
    assert "logprobs" not in calls[1]  # this provider is configured without logprobs


def test_a_remote_streams_when_it_answers(http):
    chunks = events(http, "/v1/chat/completions", {
        "model": "hosted-falcon", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    texts = [ch["choices"][0]["delta"].get("content") for ch in chunks if ch["choices"]]
    assert len([t for t in texts if t]) > 1  # streamed in pieces, not held and sent whole
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    whole = chat(http, model="demo-falcon", temperature=0, ignore_eos=True)
    assert "".join(t for t in texts if t) == whole["choices"][0]["message"]["content"]


def test_sampling_fields_reach_a_remote_expert(http):
    greedy = chat(http, model="demo-falcon", temperature=0)["choices"][0]["message"]["content"]
    remote = chat(http, model="hosted-falcon", temperature=1.5, top_k=1, seed=4, n=2)
    assert [c["message"]["content"] for c in remote["choices"]] == [greedy, greedy]
