"""The OpenAI request and response shapes the router speaks (the subset it supports).

Requests are strict: a parameter OpenAI defines but frugalserve does not support is rejected with
a message naming it, and an unknown parameter is rejected as OpenAI does; nothing is silently
ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
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
    sticky: bool | None = Field(
        None, description="false: route this turn afresh even inside a known conversation"
    )


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="an expert id or a routing policy")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only one choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported (must be 0)")
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's: generate through end-of-sequence tokens")
    min_tokens: int = Field(0, ge=0, description="vLLM's: no end token before this many tokens")
    frugalserve: RoutingOptions | None = None

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


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported (must be 0)")
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="tool calls are not supported")
    tool_choice: Literal["none"] | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ValueError("messages must hold at least one message")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> tuple[dict, ...]:
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return tuple(out)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="one prompt (a list of one is accepted)")
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=1,
                                   description="tokens to generate at most")
    logprobs: int | None = Field(None, ge=0, le=1, description="0 or 1: the sampled token's logprob")
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

    def prompt_text(self) -> str:
        """The one prompt (the validator has unpacked a list of one)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
