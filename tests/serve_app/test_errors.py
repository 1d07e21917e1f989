"""Bad input gets an OpenAI-shaped 4xx naming the problem, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

OK = {"model": "demo-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as client:
        yield client


def with_(**changes):
    body = dict(OK)
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return body


# name -> (body, status, param, code): docs/api.md's error table, case by case
CASES = {
    "missing model": (with_(model=None), 400, "model", "missing_parameter"),
    "unknown model": (with_(model="gpt-9"), 404, "model", "model_not_found"),
    "empty messages": (with_(messages=[]), 400, "messages", "invalid_value"),
    "max_tokens zero": (with_(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "max_tokens above context": (with_(max_tokens=10**6), 400, "messages",
                                 "context_length_exceeded"),
    "prompt longer than context": (
        with_(model="demo-falcon", messages=[{"role": "user", "content": "word " * 400}]),
        400, "messages", "context_length_exceeded"),
    "n above the bound": (with_(n=17), 400, "n", "invalid_value"),
    "top_logprobs above 20": (with_(logprobs=True, top_logprobs=21), 400, "top_logprobs",
                              "invalid_value"),
    "top_logprobs without logprobs": (with_(top_logprobs=2), 400, None, "invalid_value"),
    "logit_bias key not a token id": (with_(logit_bias={"a": 1}), 400, "logit_bias",
                                      "invalid_value"),
    "logit_bias outside the vocabulary": (with_(logit_bias={"999999": -100}), 400, "logit_bias",
                                          "unsupported_parameter"),
    "penalty out of range": (with_(presence_penalty=3), 400, "presence_penalty", "invalid_value"),
    "tools without a template that renders them": (
        with_(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        400, "tools", "unsupported_parameter"),
    "bad tool_choice": (with_(tool_choice="sometimes"), 400, "tool_choice", "invalid_value"),
    "bad response_format": (with_(response_format={"type": "yaml"}), 400,
                            "response_format.type", "invalid_value"),
    "json_schema without a schema": (with_(response_format={"type": "json_schema"}), 400,
                                     "response_format", "invalid_value"),
    "bad role": (with_(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role",
                 "invalid_value"),
    "unknown policy": (with_(frugalserve={"policy": "magic"}), 400, "frugalserve.policy",
                       "unknown_policy"),
    "unknown frugalserve option": (with_(frugalserve={"budgett": 1}), 400,
                                   "frugalserve.budgett", "unknown_parameter"),
    "budget too low": (with_(model="cascade", frugalserve={"budget": 1e-12}), 400,
                       "frugalserve.budget", "budget_too_low"),
    "bad options in the model name": (with_(model="cascade:budget=lots"), 400, "model",
                                      "invalid_value"),
    "options for an expert": (with_(model="demo-llama:budget=1"), 400, "model", "invalid_value"),
    "stream_options without stream": (with_(stream_options={"include_usage": True}), 400, None,
                                      "invalid_value"),
    "logprobs from a provider without them": (with_(model="flaky", logprobs=True), 400,
                                              "logprobs", "unsupported_parameter"),
    "vLLM fields to an OpenAI-only provider": (with_(model="flaky", top_k=3), 400, "top_k",
                                               "unsupported_parameter"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_chat_request(http, name):
    body, status, param, code = CASES[name]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"]) == (param, code), err
    assert http.post("/v1/chat/completions", json=OK).status_code == 200


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json=with_(metadata={"a": "b"}, store=False,
                                                      parallel_tool_calls=True, foo_bar=1))
    assert r.status_code == 200, r.text


def test_unavailable_expert_says_when_to_retry(http):
    r = http.post("/v1/chat/completions", json=with_(model="dead"))
    assert r.status_code == 503, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (None, "expert_unavailable")
    assert r.headers["retry-after"] == "1"


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "demo-llama", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (None, "invalid_json")
    r = http.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (None, "invalid_body")
    assert http.post("/v1/chat/completions", json=OK).status_code == 200


def test_bad_completion_requests(http):
    for body, param, code in [
        ({"model": "demo-llama", "prompt": ""}, "prompt", "invalid_value"),
        ({"model": "demo-llama", "prompt": ["a", "b"]}, "prompt", "invalid_value"),
        ({"model": "demo-llama", "prompt": "x", "echo": True}, "echo", "invalid_value"),
        ({"model": "demo-llama", "prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
        ({"model": "demo-falcon", "prompt": "x " * 300, "max_tokens": 4}, "prompt",
         "context_length_exceeded"),
        ({"model": "demo-llama", "prompt": "x", "response_format": {"type": "json_object"}},
         None, None),  # not a completions field: ignored
    ]:
        r = http.post("/v1/completions", json=body)
        if code is None:
            assert r.status_code == 200, r.text
            continue
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code), err


def test_streaming_errors_come_before_the_stream(http):
    r = http.post("/v1/chat/completions", json=with_(max_tokens=10**6, stream=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_typed_errors(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=OK["messages"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo-llama", messages=[])
