"""The OpenAI request shapes the router speaks, with vLLM's extra sampling fields.

Unknown top-level fields are accepted and ignored with a debug log, as vLLM's server does (SDKs,
LiteLLM and benchmark tools send fields of their own); a known field out of range is a 400 that
names it, and one an expert cannot honour is a 400 naming the field and the expert (its client
or engine says so). frugalserve's own `frugalserve` object stays strict.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

from frugalserve.experts.engine import Guide, SamplingParams
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger("ray.serve")
MAX_TOP_LOGPROBS = 20  # vLLM's and OpenAI's bound
MAX_N = 16

# OpenAI's default for /v1/completions. Chat requests have none: the expert's
# `max_tokens_default` applies, capped by the context left.
COMPLETIONS_MAX_TOKENS = 16


class UnsupportedParameter(ValueError):
    """A known OpenAI parameter set to a value frugalserve does not support."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # refusal, audio, ...: ignored
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedParameter(
                    "messages", "only text content parts are supported (type: 'text')"
                )
            parts.append(part["text"])
        return "".join(parts)


class RoutingOptions(BaseModel):
    """frugalserve's own request options, sent as `frugalserve: {...}` in the body (the
    openai client's `extra_body`). Routing policies read them."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(None, description="a routing policy to use instead of `model`")
    expert: str | None = Field(None, description="force this expert, bypassing any policy")
    budget: float | None = Field(None, gt=0, description="most cost units this request may spend")
    max_tier: int | None = Field(None, ge=0, description="highest cascade tier index to try")
    start_tier: int | None = Field(None, ge=0, description="cascade tier index to start at")
    sticky: bool | None = Field(
        None, description="false: route this turn afresh even inside a known conversation"
    )


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: ignored, logged at debug level

    model: str = Field(..., min_length=1, description="an expert id, a routing policy or an alias")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM's: keep the k most likely tokens; 0 or -1: all")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's: drop tokens under min_p x the best")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM's: > 1 discourages repeats")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    n: int = Field(1, ge=1, le=MAX_N, description="choices; they batch together")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="vLLM's: token ids that end the answer")
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's: generate through end-of-sequence tokens")
    min_tokens: int = Field(0, ge=0, description="vLLM's: no end token before this many tokens")
    frugalserve: RoutingOptions | None = None

    @model_validator(mode="after")
    def _ignore_unknown(self):
        if self.model_extra:
            logger.debug("ignoring unknown request fields %s", sorted(self.model_extra))
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be within [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        wanted = self.wanted_tokens()
        if wanted is not None and self.min_tokens > wanted:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({wanted})")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def wanted_tokens(self) -> int | None:
        raise NotImplementedError

    logprobs: Any = None  # the subclasses' (chat: bool, completions: int)

    def top_logprobs_wanted(self) -> int:
        return 0

    def guide(self) -> Guide | None:
        return None

    def sampling(self) -> SamplingParams:
        """What the engine is asked for."""
        return SamplingParams(
            max_tokens=self.wanted_tokens(), temperature=self.temperature, top_p=self.top_p,
            top_k=max(0, self.top_k), min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            stop=self.stops(), seed=self.seed, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, stop_token_ids=tuple(self.stop_token_ids or ()),
            n=self.n, logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs_wanted(),
            guide=self.guide())


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema":
            if not isinstance(self.json_schema, dict) or not isinstance(
                    self.json_schema.get("schema"), dict):
                raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return self

    def guide(self) -> Guide | None:
        if self.type == "json_object":
            return Guide("json_object")
        if self.type == "json_schema" and self.json_schema is not None:
            return Guide("json_schema", json.dumps(self.json_schema["schema"]),
                         str(self.json_schema.get("name", "answer")), self.json_schema.get("strict"))
        return None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ValueError("messages must hold at least one message")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or a function")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_wanted(self) -> int:
        return self.top_logprobs or 0 if self.logprobs else 0

    def guide(self) -> Guide | None:
        return self.response_format.guide() if self.response_format is not None else None

    def plain_messages(self) -> tuple[dict, ...]:
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            msg: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return tuple(out)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="one prompt (a list of one is accepted)")
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=1,
                                   description="tokens to generate at most")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the sampled token's logprob and this many others")
    echo: bool = Field(False, description="not supported (must be false)")
    suffix: str | None = Field(None, max_length=0, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported (must be 1)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt is supported per request")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_wanted(self) -> int:
        return self.logprobs or 0

    def prompt_text(self) -> str:
        """The one prompt (the validator has unpacked a list of one)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def now() -> int:
    return int(time.time())
