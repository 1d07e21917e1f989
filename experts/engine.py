"""The engine interface every expert runs behind.

An engine owns one model replica. It generates for a batch of requests at once and streams
tokens for one request; it knows nothing of Ray. The transformers engine is the default; the
vLLM engine is optional.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the generator."""

    max_tokens: int | None = 16  # None: the engine's default, capped by the context left
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One request: either chat `messages` or a raw `prompt`, never both."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict, ...] | None = None  # [{"role": ..., "content": ...}, ...]
    prompt: str | None = None
    request_id: str = ""
    adapter: str | None = None  # a LoRA adapter of the engine's base model; None: the base


@dataclass(frozen=True)
class Completion:
    """The engine's answer to one request. Logprobs are always there: the cascade scores them."""

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]  # log p(token) under the model, one per generated token
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    token_texts: tuple[str, ...] = ()  # each generated token as text, for OpenAI-style logprobs


@dataclass(frozen=True)
class StreamDelta:
    """One streamed piece of a completion; the last one has `finish_reason` and `completion`."""

    text: str
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    completion: Completion | None = None


class Engine(abc.ABC):
    """An async engine serving one model replica.

    The primitive is `stream_batch`: one engine call for a batch of requests, yielding after every
    decoding step a list with one slot per request. `generate` and `stream` are built on it.
    """

    @abc.abstractmethod
    def stream_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[list[StreamDelta | None]]:
        """Decode a batch together. Each yielded list has one slot per request: a `StreamDelta`
        (possibly with empty text) while it runs, the final delta (with `finish_reason` and the
        whole `Completion`) once, and `None` after it finished."""

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Generate for a batch of requests at once; one `Completion` per request, in order."""
        done: list[Completion | None] = [None] * len(requests)
        async for step in self.stream_batch(requests):
            for i, delta in enumerate(step):
                if delta is not None and delta.completion is not None:
                    done[i] = delta.completion
        assert all(c is not None for c in done), "engine ended a batch without finishing it"
        return done  # type: ignore[return-value]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Stream one request's tokens; the final delta carries the whole `Completion`."""
        async for step in self.stream_batch([request]):
            if step[0] is not None:
                yield step[0]

    @abc.abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """How many tokens the request's prompt takes once templated and tokenized."""

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """The longest prompt + completion the engine accepts, in tokens."""

    def memory_stats(self) -> dict[str, float]:
        """Memory facts of the replica (bytes); engines fill in what they know."""
        return {}
