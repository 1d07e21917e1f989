"""OpenAI response bodies and SSE chunks, built in one place.

`ResponseBuilder` makes every JSON object one response sends: the whole body, or the stream's
chunks (the chat role chunk, text deltas, the final chunk with `finish_reason`, logprobs and the
routing record, the usage chunk). `live_events` streams an expert's deltas as SSE events;
`held_events` sends an answer that was held until accepted (cascade, top-k gate) in one piece.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from frugalserve.experts.engine import Completion
from frugalserve.serve_app.clients import ExpertStream
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.metrics import StreamTimer, router_metrics
from frugalserve.serve_app.record import Prices, RoutingRecord

DONE = "[DONE]"


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def _alternatives(c: Completion, i: int) -> tuple[tuple[str, float], ...]:
    return c.top_logprobs[i] if i < len(c.top_logprobs) else ()


def chat_logprobs(c: Completion) -> dict[str, Any]:
    texts = c.token_texts or tuple("" for _ in c.token_logprobs)
    return {"content": [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                          for a, alp in _alternatives(c, i)]}
        for i, (t, lp) in enumerate(zip(texts, c.token_logprobs))]}


def completion_logprobs(c: Completion) -> dict[str, Any]:
    texts = list(c.token_texts or ("" for _ in c.token_logprobs))
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top = [dict(_alternatives(c, i)) for i in range(len(texts))] if c.top_logprobs else None
    return {"tokens": texts, "token_logprobs": list(c.token_logprobs), "top_logprobs": top,
            "text_offset": offsets}


def tool_calls(c: Completion, streamed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` (a chunk's carry their `index`)."""
    calls = [dict(call) for call in c.tool_calls]
    if streamed:
        calls = [{"index": i, **call} for i, call in enumerate(calls)]
    return calls


class ResponseBuilder:
    """The objects of one response to a chat (`chat=True`) or text completion request."""

    def __init__(self, request_id: str, created: int, *, chat: bool, logprobs: bool,
                 include_usage: bool = False):
        self.rid, self.created, self.chat = request_id, created, chat
        self.logprobs, self.include_usage = logprobs, include_usage

    def _logprobs(self, c: Completion | None) -> dict[str, Any] | None:
        if not self.logprobs or c is None:
            return None
        return chat_logprobs(c) if self.chat else completion_logprobs(c)

    def _head(self, obj: str, model: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": model}

    def _choice(self, c: Completion) -> dict[str, Any]:
        lp = self._logprobs(c)
        if not self.chat:
            return {"index": c.index, "text": c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if c.tool_calls:
            message = {"role": "assistant", "content": c.text or None,
                       "tool_calls": tool_calls(c)}
        return {"index": c.index, "message": message, "logprobs": lp,
                "finish_reason": c.finish_reason}

    def body(self, c: Completion, rec: RoutingRecord) -> dict[str, Any]:
        """The whole (non-streaming) response: one choice per `c.choices`."""
        head = self._head("chat.completion" if self.chat else "text_completion", rec.answered_by)
        return {**head, "choices": [self._choice(x) for x in c.choices], "usage": rec.usage(c),
                "frugalserve": rec.as_dict()}

    def chunk(self, model: str, text: str | None, finish: str | None = None,
              c: Completion | None = None, first: bool = False, index: int = 0,
              ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            if c is not None and c.tool_calls:
                delta["tool_calls"] = tool_calls(c, streamed=True)
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(c),
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self._logprobs(c),
                      "finish_reason": finish}
        head = self._head("chat.completion.chunk" if self.chat else "text_completion", model)
        return {**head, "choices": [choice]}

    def opening(self, model: str, n: int = 1) -> Iterator[str]:
        """What a stream sends first: the chat role chunk of each choice (nothing for text
        completions)."""
        if self.chat:
            for i in range(n):
                yield sse(self.chunk(model, None, first=True, index=i))

    def closing(self, model: str, text: str, c: Completion, rec: RoutingRecord,
                index: int = 0) -> Iterator[str]:
        """Each choice's final chunk (finish reason, logprobs; `text` is the rest of choice
        `index`), the last with the routing record, then usage if asked for."""
        choices = c.choices
        for x in choices[:-1]:
            yield sse(self.chunk(model, text if x.index == index else None, x.finish_reason, x,
                                 index=x.index))
        end = choices[-1]
        last = self.chunk(model, text if end.index == index else None, end.finish_reason, end,
                          index=end.index)
        yield sse({**last, "frugalserve": rec.as_dict()})
        if self.include_usage:
            yield sse({**self._head(last["object"], model), "choices": [], "usage": rec.usage(c),
                       "frugalserve": rec.as_dict()})


Finish = Callable[[RoutingRecord, Completion], None]  # called once the answer is complete


async def held_events(b: ResponseBuilder, c: Completion, rec: RoutingRecord,
                      timer: StreamTimer) -> AsyncIterator[str]:
    for event in b.opening(rec.answered_by, len(c.choices)):
        yield event
    timer.token()
    for x in c.choices[1:]:
        yield sse(b.chunk(rec.answered_by, x.text, index=x.index))
    for event in b.closing(rec.answered_by, c.text, c, rec):
        yield event
    yield sse(DONE)
    timer.done()


async def live_events(b: ResponseBuilder, stream: ExpertStream, rec: RoutingRecord,
                      prices: Prices, timer: StreamTimer, finish: Finish, n: int = 1,
                      ) -> AsyncIterator[str]:
    """Stream `stream`'s deltas; its run joins `rec` when the completion arrives. Headers are
    sent by then, so an error on the way is reported in-band, OpenAI-shaped."""
    expert = stream.expert
    for event in b.opening(expert, n):
        yield event
    try:
        async for delta in stream:
            c = delta.completion
            if c is None and not delta.text:
                continue
            timer.token()
            if c is None:
                yield sse(b.chunk(expert, delta.text, index=delta.index))
                continue
            rec.add(expert, c, prices)
            for event in b.closing(expert, delta.text, c, rec, delta.index):
                yield event
            finish(rec, c)
    except (asyncio.CancelledError, GeneratorExit):
        stream.cancel()  # the client went away: free its place in the expert's batch
        raise
    except Exception as exc:  # noqa: BLE001 - a stream always ends with an error event and [DONE]
        error = exc if isinstance(exc, APIError) else APIError(
            500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        router_metrics()["stream_errors"].inc(1, {"expert": expert, "code": str(error.code)})
        yield sse(error.body())
    yield sse(DONE)
    timer.done()
