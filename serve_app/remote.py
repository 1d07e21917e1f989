"""A remote OpenAI-compatible endpoint as an expert (a `remote` section), e.g. a hosted model at
the end of a cascade: the `ExpertClient` over the official `openai.AsyncOpenAI` client, with its
timeouts and its retries (exponential backoff that honours the endpoint's Retry-After). It
streams when the caller streams and this expert answers. The API key comes from an environment
variable and never reaches logs. What the endpoint accepts is configured per expert
(`RemoteSpec`): a request field it cannot take is a 400 naming the field and the expert."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from frugalserve.experts.engine import Completion, GenerationRequest, SamplingParams, StreamDelta
from frugalserve.serve_app.breaker import STATE_VALUES, CircuitBreaker
from frugalserve.serve_app.clients import ExpertStream, expert_error, prompt_param, timed_out
from frugalserve.serve_app.config import ExpertConfig
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.metrics import router_metrics

VLLM_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids")
_NEUTRAL = SamplingParams()


# what opens the breaker: the endpoint failed, not the request (a 400 leaves it as it is)
BREAKER_CODES = frozenset({"expert_unavailable", "expert_timeout", "rate_limit_exceeded"})


class RemoteClient:
    def __init__(self, expert: ExpertConfig, deadline_s: float):
        assert expert.remote is not None  # make_clients gives this client remote experts only
        self.expert, self.spec, self.name = expert, expert.remote, expert.name
        spec = self.spec
        self.timeout_s = spec.timeout_s
        self.breaker = CircuitBreaker(spec.allowed_fails, spec.cooldown_s)
        self.last_error = ""  # what the last failed call said (in the breaker's refusals)
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url.rstrip("/"), api_key=key or "unused",
            timeout=openai.Timeout(spec.timeout_s or deadline_s, connect=spec.connect_timeout_s),
            max_retries=spec.max_retries)
        self._publish()

    def _publish(self) -> None:
        router_metrics()["circuit_state"].set(STATE_VALUES[self.breaker.state],
                                              {"expert": self.name})

    def _admit(self) -> None:
        """Refuse at once while the breaker is open (the request moves to its fallback)."""
        allowed = self.breaker.allow()
        self._publish()
        if not allowed:
            wait = self.breaker.retry_in_s()
            raise APIError(503, f"remote expert {self.name!r} is cooling down after "
                           f"{self.breaker.failures} failed calls in a row (the last: "
                           f"{self.last_error}); next call in {wait:.1f} s", type="server_error",
                           code="expert_unavailable", retry_after=max(1, math.ceil(wait)))

    @contextlib.contextmanager
    def _call(self, request: GenerationRequest) -> Iterator[None]:
        """One call to the endpoint: refused while the breaker is open, its outcome counted;
        what it raised becomes an `APIError`."""
        self._admit()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI-shaped error
            error = self._error(exc, request)
            if error.code in BREAKER_CODES:
                self.breaker.failure(_retry_after(getattr(exc, "response", None), 0))
                self.last_error = error.message
            else:
                self.breaker.success()  # it answered: the request was what it refused
            self._publish()
            raise error from None
        except BaseException:
            self.breaker.trial = False  # cancelled: this call decides nothing
            raise
        self.breaker.success()
        self._publish()

    async def info(self) -> dict[str, Any]:
        e, s = self.expert, self.spec
        return {
            "name": e.name, "model": s.model or e.name, "engine": "openai",
            "max_context": s.max_context, "max_tokens_default": None,
            "num_parameters": 0, "cost_per_1k_prompt": e.cost_per_1k_prompt,
            "cost_per_1k_completion": e.cost_per_1k_completion,
            "batching": "remote", "attention": {"attention": "remote"},
            "description": e.description, "circuit": self.breaker.as_dict(),
        }

    # -- the request ------------------------------------------------------------------------

    def _unsupported(self, field: str, why: str) -> APIError:
        return APIError(400, f"expert {self.name!r} cannot honour `{field}`: {why}", param=field,
                        code="unsupported_parameter")

    def body(self, request: GenerationRequest, stream: bool = False) -> dict[str, Any]:
        """The keyword arguments of the endpoint call for `request`."""
        p, s, chat = request.params, self.spec, request.messages is not None
        if not s.logprobs and (p.logprobs or p.top_logprobs):
            raise self._unsupported("logprobs", "this endpoint does not return logprobs")
        body: dict[str, Any] = {"model": s.model or self.name, "temperature": p.temperature,
                                "top_p": p.top_p, "n": p.n}
        if p.max_tokens is not None:
            body[s.max_tokens_field if chat else "max_tokens"] = p.max_tokens
        for name in ("presence_penalty", "frequency_penalty", "seed"):
            if getattr(p, name) != getattr(_NEUTRAL, name):
                body[name] = getattr(p, name)
        if p.stop:
            body["stop"] = list(p.stop)
        if p.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
        extra = {f: getattr(p, f) for f in VLLM_FIELDS if getattr(p, f) != getattr(_NEUTRAL, f)}
        if extra and not s.vllm_sampling:
            field = next(iter(extra))
            raise self._unsupported(field, "this endpoint takes OpenAI's fields only (set "
                                    "`remote.vllm_sampling: true` for a vLLM server)")
        if extra:
            body["extra_body"] = {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}
        if chat:
            body["messages"] = list(request.messages or ())
            if s.logprobs:
                body["logprobs"] = True
                if p.top_logprobs:
                    body["top_logprobs"] = p.top_logprobs
            if p.guide is not None:
                body["response_format"] = response_format(p)
            if request.tools:
                body["tools"] = list(request.tools)
                if request.tool_choice is not None:
                    body["tool_choice"] = request.tool_choice
        else:
            if p.guide is not None:
                raise self._unsupported("response_format", "structured output needs chat")
            body["prompt"] = request.prompt
            if s.logprobs:
                body["logprobs"] = p.top_logprobs or 1  # 1: the sampled token's, for the scorer
        if stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
        return body

    # -- calls ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, timeout_s: float | None = None,
                       ) -> Completion:
        body = self.body(request)
        api = self._client.chat.completions if request.messages is not None else self._client.completions
        with self._call(request):
            data = await asyncio.wait_for(api.create(**body), timeout_s or self.timeout_s)
        return completion(data.model_dump(), chat=request.messages is not None)

    async def stream(self, request: GenerationRequest, timeout_s: float | None = None,
                     ) -> ExpertStream:
        if request.tools:  # tool-call deltas are not re-assembled: answered whole
            return ExpertStream.whole(self.name, await self.generate(request, timeout_s))
        body = self.body(request, stream=True)
        chat = request.messages is not None
        api = self._client.chat.completions if chat else self._client.completions

        async def opened() -> tuple[AsyncIterator[StreamDelta], StreamDelta]:
            gen = _deltas(await api.create(**body), chat, request.params.n)
            return gen, await anext(gen)

        with self._call(request):
            gen, first = await asyncio.wait_for(opened(), timeout_s or self.timeout_s)
        return ExpertStream(self.name, first, gen, lambda: None, self.timeout_s)

    def _error(self, exc: BaseException, request: GenerationRequest) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return timed_out(self.name)
        if isinstance(exc, openai.APIConnectionError):
            return APIError(503, f"remote expert {self.name!r} at {self.spec.base_url} is "
                            f"unreachable: {type(exc.__cause__ or exc).__name__}", type="server_error",
                            code="expert_unavailable", retry_after=1)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = f"remote expert {self.name!r} answered {status}: {exc.message[:300]}"
            if status == 429:
                return APIError(429, detail, type="rate_limit_error", code="rate_limit_exceeded",
                                retry_after=_retry_after(exc.response))
            if 400 <= status < 500:
                return APIError(400, detail, param=_param(exc), code="upstream_rejected")
            return APIError(503, detail, type="server_error", code="expert_unavailable",
                            retry_after=_retry_after(exc.response))
        return expert_error(exc, self.name, prompt_param(request))

    async def aclose(self) -> None:
        await self._client.close()


def response_format(p: SamplingParams) -> dict[str, Any]:
    g = p.guide
    assert g is not None
    if g.kind == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": g.name, "schema": json.loads(g.schema or "{}")}
    if g.strict is not None:
        schema["strict"] = g.strict
    return {"type": "json_schema", "json_schema": schema}


def _retry_after(response: Any, default: int = 1) -> int:
    """The endpoint's `Retry-After` in whole seconds (at least 1), or `default` without one."""
    value = (response.headers if response is not None else {}).get("retry-after")
    try:
        return default if value is None else max(1, math.ceil(float(value)))
    except ValueError:
        return default


def _param(exc: openai.APIStatusError) -> str | None:
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return err.get("param") if isinstance(err, dict) else None


def _logprob_rows(lp: dict | None, chat: bool) -> tuple[tuple[float, ...], tuple[str, ...], tuple]:
    """(logprobs, token texts, top logprobs) of one choice's `logprobs` object."""
    if not lp:
        return (), (), ()
    if chat:
        content = lp.get("content") or []
        return (tuple(float(t["logprob"]) for t in content),
                tuple(str(t.get("token", "")) for t in content),
                tuple(tuple((a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or [])
                      for t in content) if any(t.get("top_logprobs") for t in content) else ())
    pairs = [(t, x) for t, x in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [])
             if x is not None]
    top = tuple(tuple(d.items()) for d in lp.get("top_logprobs") or [] if d) if lp.get("top_logprobs") else ()
    return tuple(float(x) for _, x in pairs), tuple(str(t) for t, _ in pairs), top


def completion(data: dict, chat: bool) -> Completion:
    """A `Completion` (every choice) from an OpenAI response body."""
    usage = data.get("usage") or {}
    choices = []
    for choice in sorted(data["choices"], key=lambda c: c.get("index", 0)):
        lps, toks, top = _logprob_rows(choice.get("logprobs"), chat)
        calls: tuple[dict, ...] = ()
        if chat:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            calls = tuple({k: v for k, v in call.items() if v is not None}
                          for call in message.get("tool_calls") or [])
        else:
            text = choice.get("text", "")
        choices.append(Completion(
            text=text, token_ids=(), token_logprobs=lps, prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=len(lps), finish_reason=choice.get("finish_reason") or "stop",
            token_texts=toks, top_logprobs=top, tool_calls=calls, index=int(choice.get("index", 0))))
    total = int(usage.get("completion_tokens", sum(c.completion_tokens for c in choices)))
    first, *rest = choices
    # usage counts every choice; without per-choice counts the first carries what is not known
    return dataclasses.replace(first, others=tuple(rest), completion_tokens=max(
        0, total - sum(c.completion_tokens for c in rest)))


async def _deltas(upstream, chat: bool, n: int) -> AsyncIterator[StreamDelta]:
    """StreamDeltas from an OpenAI stream; the last one carries the whole completion."""
    texts = [""] * n
    rows: list[dict] = [{"content": [], "tokens": [], "token_logprobs": [], "top_logprobs": []}
                        for _ in range(n)]
    finish: list[str | None] = [None] * n
    usage: dict = {}
    async for chunk in upstream:
        data = chunk.model_dump()
        usage = data.get("usage") or usage
        for choice in data.get("choices") or []:
            i = int(choice.get("index", 0))
            piece = ((choice.get("delta") or {}).get("content") or "") if chat else choice.get("text") or ""
            texts[i] += piece
            lp = choice.get("logprobs") or {}
            for key in rows[i]:
                rows[i][key] += (lp.get(key) or []) if key != "top_logprobs" or not chat else []
            finish[i] = choice.get("finish_reason") or finish[i]
            if piece:
                yield StreamDelta(text=piece, index=i)
    body = {"usage": usage, "choices": [
        {"index": i, "finish_reason": finish[i] or "stop",
         **({"message": {"content": texts[i]}, "logprobs": {"content": rows[i]["content"]}}
            if chat else {"text": texts[i], "logprobs": {k: rows[i][k] for k in
                                                          ("tokens", "token_logprobs", "top_logprobs")}})}
        for i in range(n)]}
    c = completion(body, chat)
    yield StreamDelta(text="", finish_reason=c.finish_reason, completion=c, index=n - 1)
