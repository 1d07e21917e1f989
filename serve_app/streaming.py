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
from frugalserve.serve_app.metrics import StreamTimer
from frugalserve.serve_app.record import Prices, RoutingRecord

DONE = "[DONE]"


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def chat_logprobs(c: Completion) -> dict[str, Any]:
    texts = c.token_texts or tuple("" for _ in c.token_ids)
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                         "top_logprobs": []} for t, lp in zip(texts, c.token_logprobs)]}


def completion_logprobs(c: Completion) -> dict[str, Any]:
    texts = list(c.token_texts or ("" for _ in c.token_ids))
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": list(c.token_logprobs), "top_logprobs": None,
            "text_offset": offsets}


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

    def body(self, c: Completion, rec: RoutingRecord) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        lp = self._logprobs(c)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text},
                      "logprobs": lp, "finish_reason": c.finish_reason}
        else:
            choice = {"index": 0, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
        head = self._head("chat.completion" if self.chat else "text_completion", rec.answered_by)
        return {**head, "choices": [choice], "usage": rec.usage(c), "frugalserve": rec.as_dict()}

    def chunk(self, model: str, text: str | None, finish: str | None = None,
              c: Completion | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(c),
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": self._logprobs(c),
                      "finish_reason": finish}
        head = self._head("chat.completion.chunk" if self.chat else "text_completion", model)
        return {**head, "choices": [choice]}

    def opening(self, model: str) -> Iterator[str]:
        """What a stream sends first: the chat role chunk (nothing for text completions)."""
        if self.chat:
            yield sse(self.chunk(model, None, first=True))

    def closing(self, model: str, text: str, c: Completion, rec: RoutingRecord) -> Iterator[str]:
        """The final chunk (finish reason, logprobs, routing record), then usage if asked for."""
        last = self.chunk(model, text, c.finish_reason, c)
        yield sse({**last, "frugalserve": rec.as_dict()})
        if self.include_usage:
            yield sse({**self._head(last["object"], model), "choices": [], "usage": rec.usage(c),
                       "frugalserve": rec.as_dict()})


Finish = Callable[[RoutingRecord, Completion], None]  # called once the answer is complete


async def held_events(b: ResponseBuilder, c: Completion, rec: RoutingRecord,
                      timer: StreamTimer) -> AsyncIterator[str]:
    for event in b.opening(rec.answered_by):
        yield event
    timer.token()
    for event in b.closing(rec.answered_by, c.text, c, rec):
        yield event
    yield sse(DONE)
    timer.done()


async def live_events(b: ResponseBuilder, stream: ExpertStream, rec: RoutingRecord,
                      prices: Prices, timer: StreamTimer, finish: Finish) -> AsyncIterator[str]:
    """Stream `stream`'s deltas; its run joins `rec` when the completion arrives. Headers are
    sent by then, so an error on the way is reported in-band, OpenAI-shaped."""
    expert = stream.expert
    for event in b.opening(expert):
        yield event
    try:
        async for delta in stream:
            c = delta.completion
            if c is None and not delta.text:
                continue
            timer.token()
            if c is None:
                yield sse(b.chunk(expert, delta.text))
                continue
            rec.add(expert, c, prices)
            for event in b.closing(expert, delta.text, c, rec):
                yield event
            finish(rec, c)
    except APIError as exc:
        yield sse(exc.body())
    except (asyncio.CancelledError, GeneratorExit):
        stream.cancel()  # the client went away: free its place in the expert's batch
        raise
    yield sse(DONE)
    timer.done()
