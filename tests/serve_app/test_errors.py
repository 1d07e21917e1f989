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


CASES = {
    "missing model": (with_(model=None), 400, "model"),
    "unknown model": (with_(model="gpt-9"), 404, "gpt-9"),
    "empty messages": (with_(messages=[]), 400, "messages"),
    "max_tokens zero": (with_(max_tokens=0), 400, "max_tokens"),
    "max_tokens above context": (with_(max_tokens=10**6), 400, "maximum context length"),
    "prompt longer than context": (
        with_(model="demo-falcon", messages=[{"role": "user", "content": "word " * 400}]),
        400, "maximum context length"),
    "unknown parameter": (with_(logit_bias={"1": 2}), 400, "logit_bias"),
    "unsupported n": (with_(n=3), 400, "n"),
    "unsupported tools": (with_(tools=[{"type": "function"}]), 400, "tools"),
    "unsupported penalty": (with_(presence_penalty=0.5), 400, "presence_penalty"),
    "bad role": (with_(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    "unknown policy": (with_(frugalserve={"policy": "magic"}), 400, "magic"),
    "stream_options without stream": (with_(stream_options={"include_usage": True}), 400,
                                      "stream_options"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_chat_request(http, name):
    body, status, needle = CASES[name]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] or needle == err["param"], err
    assert http.post("/v1/chat/completions", json=OK).status_code == 200


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "demo-llama", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=OK).status_code == 200


def test_bad_completion_requests(http):
    for body, needle in [
        ({"model": "demo-llama", "prompt": ""}, "prompt"),
        ({"model": "demo-llama", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "demo-llama", "prompt": "x", "echo": True}, "echo"),
        ({"model": "demo-falcon", "prompt": "x " * 300, "max_tokens": 4}, "maximum context"),
    ]:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] or needle == err["param"], err


def test_streaming_errors_come_before_the_stream(http):
    r = http.post("/v1/chat/completions", json=with_(max_tokens=10**6, stream=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_typed_errors(app_url):
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=OK["messages"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo-llama", messages=[])
