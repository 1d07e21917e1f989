"""The engine contract: everything an expert deployment calls on the engine that runs its model.

An engine owns one model replica and knows nothing of Ray. Two kinds exist:

- engines that batch themselves (`batches_itself = True`: the continuous-batching paged engine,
  vLLM): the deployment hands each request to `stream` as it arrives and the engine's own loop
  admits it into the running batch at the next step;
- engines that run one static batch at a time (`batches_itself = False`: the plain transformers
  engine): the deployment collects requests with Serve's batcher and calls `stream_batch`.

Both share admission (`admit`: tokenize, check the adapter, fit the context, once per request),
the errors below (the router maps them to 4xx without importing torch), `EngineInfo` (what runs,
reported by `/v1/models`), cancellation, statistics and the memory profile the autoscaler reads.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# -- errors: a request this engine cannot serve (the router answers 400) ---------------------


class EngineError(ValueError):
    """A request the engine refuses; the message says why, for the client."""


class PromptTooLongError(EngineError):
    """The prompt plus `max_tokens` does not fit the model's context."""


class UnknownAdapterError(EngineError):
    """The request names a LoRA adapter the engine does not serve."""


class NoChatTemplateError(EngineError):
    """Chat messages sent to a model without a chat template."""


class UnsupportedFeatureError(EngineError):
    """A request field this engine knows but cannot honour (tools without a template that renders
    them, structured output without its library, ...); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message, param)  # both in args: the error crosses Ray by pickling

    @property
    def param(self) -> str:
        return str(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])


# -- requests and answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Guide:
    """Structured output: the answer must be JSON (`json_object`) or JSON valid under a schema
    (`json_schema`; `schema` is the schema as JSON text, `name` and `strict` as the client sent)."""

    kind: str  # "json_object" | "json_schema"
    schema: str | None = None
    name: str = "answer"
    strict: bool | None = None


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the generator (vLLM's SamplingParams, the fields we honour)."""

    max_tokens: int | None = None  # None: the engine's default, capped by the context left
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1): all
    min_p: float = 0.0  # drop tokens under min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the answer so far
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate through end-of-sequence tokens up to max_tokens
    min_tokens: int = 0  # end-of-sequence and stop tokens are not sampled before this many
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the answer (kept in it)
    n: int = 1  # choices: n sequences of the same prompt, batched together
    logprobs: bool = False  # the client wants logprobs in the answer (engines always compute them)
    top_logprobs: int = 0  # alternatives (token, logprob) reported per generated token, <= 20
    guide: Guide | None = None  # structured output

    @property
    def processed(self) -> bool:
        """Whether choosing a token needs more than argmax over the raw logits."""
        return (self.temperature > 0 or self.repetition_penalty != 1.0 or bool(self.logit_bias)
                or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.top_logprobs > 0 or self.guide is not None)

    def for_choice(self, index: int) -> SamplingParams:
        """Choice `index` of an n > 1 request: its own seed (vLLM's rule: seed + index)."""
        if index == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=self.seed + index)


@dataclass(frozen=True)
class GenerationRequest:
    """One request: either chat `messages` or a raw `prompt`, never both."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict, ...] | None = None  # [{"role": ..., "content": ...}, ...]
    prompt: str | None = None
    request_id: str = ""
    adapter: str | None = None  # a LoRA adapter of the engine's base model; None: the base
    tools: tuple[dict, ...] | None = None  # OpenAI tool definitions, rendered by the chat template
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", ...}


@dataclass(frozen=True)
class Admission:
    """A request the engine accepted: its prompt tokens and how many tokens it may generate."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Completion:
    """The engine's answer to one request. Logprobs are always there: the cascade scores them."""

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]  # log p(token) under the model, one per generated token
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "tool_calls"
    token_texts: tuple[str, ...] = ()  # each generated token as text, for OpenAI-style logprobs
    # per generated token, the `top_logprobs` most likely alternatives as (text, logprob)
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = ()
    tool_calls: tuple[dict, ...] = ()  # OpenAI tool calls (from remote experts)
    index: int = 0  # the choice this is, for n > 1
    others: tuple[Completion, ...] = ()  # n > 1: choices 1 .. n - 1 (this one is choice 0)

    @property
    def choices(self) -> tuple[Completion, ...]:
        return (self, *self.others)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated over every choice (what usage counts)."""
        return sum(c.completion_tokens for c in self.choices)


@dataclass(frozen=True)
class StreamDelta:
    """One streamed piece of a completion; the last one has `finish_reason` and `completion`."""

    text: str
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    completion: Completion | None = None  # the last delta of a request: every choice, finished
    index: int = 0  # the choice this piece belongs to (n > 1)


@dataclass(frozen=True)
class EngineInfo:
    """What runs in a replica, as `/v1/models` and the logs report it."""

    name: str
    engine: str  # "transformers" | "vllm"
    batching: str  # "continuous" (the engine's own loop) | "static" (one batch at a time)
    device: str
    dtype: str
    num_parameters: int
    max_context: int
    default_max_tokens: int
    attention: dict[str, str]  # kernel -> what runs there and why ("triton (...)", "reference (...)")
    quantization: str = "none"
    adapters: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)  # engine-specific facts (cache, graphs)


# -- shared admission helpers ------------------------------------------------------------------


def renders_tools(tokenizer) -> bool:
    """Whether the model's chat template does anything with `tools` (else they would vanish)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def encode_request(tokenizer, request: GenerationRequest, name: str = "model") -> list[int]:
    """Prompt token ids: the chat template for messages (with the request's tools, where the
    template renders them), BOS + text for a raw prompt."""
    if request.messages is not None:
        if tokenizer.chat_template is None:
            raise NoChatTemplateError(f"model {name!r} has no chat template; use /v1/completions")
        extra: dict[str, Any] = {}
        if request.tools and request.tool_choice != "none":
            if not renders_tools(tokenizer):
                raise UnsupportedFeatureError(
                    f"expert {name!r} cannot take `tools`: its chat template does not render them",
                    "tools")
            extra["tools"] = list(request.tools)
            if request.tool_choice not in (None, "auto"):
                raise UnsupportedFeatureError(
                    f"expert {name!r} cannot force a tool call (tool_choice "
                    f"{request.tool_choice!r}): it renders tools but does not constrain its "
                    "output to a call", "tool_choice")
        text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                             tokenize=False, **extra)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


def completion_budget(max_context: int, default_max_tokens: int, prompt_tokens: int,
                      asked: int | None) -> int:
    """Tokens the completion may take: `asked`, or the default capped by the room left.
    Raises `PromptTooLongError` when the request does not fit."""
    room = max_context - prompt_tokens
    if asked is None:
        if room < 1:
            raise PromptTooLongError(
                f"this model's maximum context length is {max_context} tokens, but the prompt "
                f"alone takes {prompt_tokens}; shorten the prompt")
        return min(default_max_tokens, room)
    if asked > room:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_context} tokens, but the request needs "
            f"{prompt_tokens + asked} ({prompt_tokens} in the prompt + {asked} in max_tokens); "
            "shorten the prompt or lower max_tokens")
    return asked


# -- the contract ------------------------------------------------------------------------------


class Engine(abc.ABC):
    """An async engine serving one model replica."""

    batches_itself: ClassVar[bool] = False
    name: str
    tokenizer: Any
    default_max_tokens: int
    adapters: Sequence[str]

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """The longest prompt + completion the engine accepts, in tokens."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """What runs in this replica (engine, batching, attention kernels and why, memory)."""

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_request(self.tokenizer, request, self.name)

    def admit(self, request: GenerationRequest) -> Admission:
        """Tokenize and check one request before it joins any batch; raises an `EngineError`
        (the request fails alone) when the engine cannot serve it."""
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownAdapterError(f"model {self.name!r} has no adapter {request.adapter!r}; "
                                      f"it has {sorted(self.adapters)}")
        ids = self.encode(request)
        budget = completion_budget(self.max_context, self.default_max_tokens, len(ids),
                                   request.params.max_tokens)
        return Admission(request, tuple(ids), budget)

    def stream_batch(self, admissions: Sequence[Admission]) -> AsyncIterator[list[StreamDelta | None]]:
        """Static engines: decode a batch together. Each yielded list has one slot per request:
        a `StreamDelta` (possibly with empty text) while it runs, the final delta (with
        `finish_reason` and the whole `Completion`) once, and `None` after it finished."""
        raise NotImplementedError(f"{type(self).__name__} batches itself; call stream()")

    async def stream(self, admission: Admission, *, final_only: bool = False,
                     ) -> AsyncIterator[StreamDelta]:
        """Stream one request's tokens; the final delta carries the whole `Completion`.
        `final_only`: the caller reads only the final delta, so an engine may skip the others."""
        async for step in self.stream_batch([admission]):
            if step[0] is not None:
                yield step[0]

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Admit and generate several requests at once; one `Completion` each, in order."""
        import asyncio

        admissions = [self.admit(r) for r in requests]

        async def one(a: Admission) -> Completion:
            async for delta in self.stream(a, final_only=True):
                if delta.completion is not None:
                    return delta.completion
            raise RuntimeError("the engine ended a request without a completion")

        if self.batches_itself:
            return list(await asyncio.gather(*(one(a) for a in admissions)))
        done: list[Completion | None] = [None] * len(admissions)
        async for step in self.stream_batch(admissions):
            for i, delta in enumerate(step):
                if delta is not None and delta.completion is not None:
                    done[i] = delta.completion
        if any(c is None for c in done):
            raise RuntimeError("the engine ended a batch without finishing it")
        return [c for c in done if c is not None]

    def cancel(self, request_id: str) -> None:
        """The caller of `request_id` went away: stop decoding it and free what it holds."""
        return None

    def release(self, admission: Admission) -> None:
        """The deployment is done with `admission` (answered, failed or cancelled)."""
        return None

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks: batch sizes, cancellations, cache use."""
        return {}

    def drain_step_sizes(self) -> list[int]:
        """Engines that batch themselves: the batch size of each step since the last call (the
        deployment turns them into the batch-size histogram). Static engines: nothing."""
        return []

    def memory_profile(self):
        """The replica's `MemoryProfile` (frugalserve.experts.memory), or None if unknown."""
        return None

    def load_stats(self) -> dict[str, float]:
        """The autoscaling signal (`record_autoscaling_stats`): bytes in use, usable bytes,
        tokens and requests in flight. Empty: Serve holds the replica count."""
        return {}

    def weight_bytes(self) -> float:
        """Bytes the model's weights take as stored (0 if unknown)."""
        return 0.0
