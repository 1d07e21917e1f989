"""How the router talks to an expert: one `ExpertClient` protocol, whatever carries the call.

`HandleClient` calls a local expert's Serve deployment through its DeploymentHandle (a LoRA
adapter is its base's deployment with `adapter` set); `RemoteClient` (remote.py) calls an
OpenAI-compatible endpoint over HTTP. Both raise `APIError` for everything that goes wrong, so
dispatch never asks which kind it holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from frugalserve.experts.engine import (
    Completion,
    EngineError,
    GenerationRequest,
    PromptTooLongError,
    StreamDelta,
    UnsupportedFeatureError,
)
from frugalserve.serve_app.deadline import RequestBudget
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.protocol import UnsupportedParameter
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError


def prompt_param(request: GenerationRequest) -> str:
    """The request field an error about the prompt names."""
    return "messages" if request.messages is not None else "prompt"


def expert_error(exc: BaseException, expert: str, param: str = "messages") -> APIError:
    """An OpenAI-shaped error for what an expert call raised (Ray wraps a replica's exception;
    the original is its `cause`)."""
    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, BackPressureError):
        return APIError(503, f"expert {expert!r} is overloaded (its queue is full); retry later",
                        type="server_error", code="overloaded", retry_after=1)
    if isinstance(inner, PromptTooLongError):
        return APIError(400, str(inner), param=param, code="context_length_exceeded")
    if isinstance(inner, UnsupportedFeatureError):
        message = str(inner) if expert in str(inner) else f"expert {expert!r}: {inner}"
        return APIError(400, message, param=inner.param, code="unsupported_parameter")
    if isinstance(inner, (EngineError, ValueError, UnsupportedParameter)):  # a request it cannot serve
        return APIError(400, f"expert {expert!r} rejected the request: {inner}")
    if isinstance(inner, asyncio.TimeoutError):
        return timed_out(expert)
    if isinstance(inner, (RayActorError, ActorUnavailableError)):
        return APIError(503, f"expert {expert!r}: the replica serving the request died or is "
                        f"unreachable ({type(inner).__name__})", type="server_error",
                        code="expert_unavailable")
    return APIError(503, f"expert {expert!r} failed: {type(inner).__name__}: {inner}",
                    type="server_error", code="expert_unavailable")


def timed_out(expert: str) -> APIError:
    """An attempt that ran past its time (the expert's timeout, or what was left of the deadline)."""
    return APIError(504, f"expert {expert!r} did not answer in time", type="timeout",
                    code="expert_timeout")


async def first_token(gen: AsyncIterator[StreamDelta]) -> StreamDelta:
    """The first delta with text (or the last one): until it has arrived the client has seen
    nothing, so a failure is still retried."""
    delta = await anext(gen)
    while not delta.text and delta.completion is None:
        delta = await anext(gen)
    return delta


class ExpertStream:
    """One expert's deltas for one request, opened: the first delta has already arrived, so an
    error before it is still an HTTP error. Iterating yields every delta, the first included;
    the last carries the whole `Completion`. Errors on the way come out as `APIError`."""

    def __init__(self, expert: str, first: StreamDelta, rest: AsyncIterator[StreamDelta],
                 cancel: Callable[[], None], gap_timeout_s: float | None):
        self.expert, self.first, self._rest, self._cancel = expert, first, rest, cancel
        self.gap_timeout_s = gap_timeout_s  # the longest wait for the next delta
        self.deadline: RequestBudget | None = None  # the request's, set by failover

    @classmethod
    def whole(cls, expert: str, c: Completion) -> ExpertStream:
        """A finished completion as a stream of one delta (an expert that does not stream)."""
        last = c.choices[-1].index
        return cls(expert, StreamDelta(c.choices[-1].text if last else c.text, c.token_ids,
                                       c.token_logprobs, c.finish_reason, c, index=last),
                   _nothing(), lambda: None, None)

    def _wait(self) -> float | None:
        if self.deadline is None:
            return self.gap_timeout_s
        left = self.deadline.remaining()
        if left <= 0:
            raise self.deadline.expired()
        return left if self.gap_timeout_s is None else min(left, self.gap_timeout_s)

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        delta = self.first
        try:
            while True:
                yield delta
                if delta.completion is not None:
                    return
                try:
                    delta = await asyncio.wait_for(anext(self._rest), self._wait())
                except asyncio.TimeoutError:
                    raise (self.deadline.expired() if self.deadline is not None and
                           self.deadline.remaining() <= 0 else timed_out(self.expert)) from None
        except StopAsyncIteration:
            raise APIError(503, f"expert {self.expert!r} ended the stream without a completion",
                           type="server_error", code="expert_unavailable") from None
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()  # the client went away: free its place in the expert's batch
            raise
        except APIError:
            self.cancel()  # past its time: the expert stops generating for nobody
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an OpenAI-shaped error
            raise expert_error(exc, self.expert) from None

    def cancel(self) -> None:
        self._cancel()


async def _nothing() -> AsyncIterator[StreamDelta]:
    return
    yield  # an async generator that yields nothing


class ExpertClient(Protocol):
    """What the router needs of an expert."""

    name: str
    timeout_s: float | None  # the expert's own limit on one call (None: the request's deadline)

    async def info(self) -> dict[str, Any]:
        """The expert's facts: costs per 1k tokens, context, engine, parameters."""
        ...

    async def generate(self, request: GenerationRequest, timeout_s: float | None = None,
                       ) -> Completion:
        """The whole completion within `timeout_s`; raises `APIError` (504 `expert_timeout`
        past it)."""
        ...

    async def stream(self, request: GenerationRequest, timeout_s: float | None = None,
                     ) -> ExpertStream:
        """Open a stream and wait (at most `timeout_s`) for its first delta; raises `APIError`."""
        ...


class HandleClient:
    """A local expert: its deployment's handle; `adapter` set for a LoRA adapter of its base."""

    def __init__(self, name: str, handle: Any, timeout_s: float | None,
                 adapter: str | None = None):
        self.name, self.handle, self.timeout_s, self.adapter = name, handle, timeout_s, adapter
        self._info: dict[str, Any] | None = None

    def _routed(self, request: GenerationRequest) -> GenerationRequest:
        return request if self.adapter is None else dataclasses.replace(request, adapter=self.adapter)

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            info = await self.handle.info.remote()
            if self.adapter is not None:
                info = {**info, "name": self.name, "adapter_of": info["name"]}
            self._info = info
        return self._info

    async def generate(self, request: GenerationRequest, timeout_s: float | None = None,
                       ) -> Completion:
        response = None
        try:
            response = self.handle.generate.remote(self._routed(request))
            return await asyncio.wait_for(response, timeout_s or self.timeout_s)
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an OpenAI-shaped error
            if isinstance(exc, asyncio.TimeoutError) and response is not None:
                response.cancel()  # nobody waits for it any more: free its batch slot
            raise expert_error(exc, self.name, prompt_param(request)) from None

    async def stream(self, request: GenerationRequest, timeout_s: float | None = None,
                     ) -> ExpertStream:
        try:
            gen = self.handle.options(stream=True).generate_stream.remote(self._routed(request))
        except BaseException as exc:  # noqa: BLE001 - e.g. Serve's backpressure, at once
            raise expert_error(exc, self.name, prompt_param(request)) from None
        try:
            first = await asyncio.wait_for(first_token(gen), timeout_s or self.timeout_s)
        except StopAsyncIteration:
            raise APIError(503, f"expert {self.name!r} ended the stream without output",
                           type="server_error", code="expert_unavailable") from None
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an OpenAI-shaped error
            gen.cancel()
            raise expert_error(exc, self.name, prompt_param(request)) from None
        return ExpertStream(self.name, first, gen, gen.cancel, self.timeout_s)
