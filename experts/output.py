"""From generated token ids to what a client sees: text deltas, stop sequences, the Completion.

Engines work in tokens; `OutputState` holds one request's tokens and turns them into stream
deltas. It is fed a few tokens at a time (one decoding step, or everything a continuous engine
produced since the consumer last looked), decodes the text once per feed, cuts at the first stop
sequence, and holds back text that could still turn into a stop sequence or a split multi-byte
character. When a stop sequence appears it reports `finish_reason="stop"` and keeps exactly the
tokens up to the one that completed it, as if generation had stopped there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from frugalserve.experts.engine import Admission, Completion, StreamDelta

TopLogprobs = tuple[tuple[int, float], ...]  # one generated token's alternatives: (id, logprob)


class OutputState:
    def __init__(self, tokenizer, admission: Admission, index: int = 0):
        self.tokenizer = tokenizer
        self.admission = admission
        self.index = index  # the choice (n > 1)
        self.top: list[TopLogprobs] = []
        self.stops = admission.request.params.stop
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, ids: Sequence[int], logprobs: Sequence[float], finish_reason: str | None = None,
            top: Sequence[TopLogprobs] = ()) -> StreamDelta | None:
        """Append generated tokens (with the engine's finish reason once it ends, and each
        token's top logprobs if asked) and return the delta to stream, or None if nothing is
        new. After the final delta, returns None."""
        if self.finished:
            return None
        self.ids.extend(ids)
        self.logprobs.extend(logprobs)
        self.top.extend(top)
        if ids or finish_reason:
            self.text = self._decode(self.ids)
        if self.stops and ids:
            cut = self._first_stop(len(ids))
            if cut is not None:
                finish_reason = "stop"
        self.finish_reason = finish_reason
        return self._delta(bool(ids))

    def _first_stop(self, new: int) -> int | None:
        """If a stop sequence appears in the text, cut there and drop the tokens generated after
        the one that completed it; return that token's index."""
        text = self.text
        if not any(s in text for s in self.stops):
            return None
        first = len(self.ids) - new
        # The earliest token whose prefix text holds a stop: before `first` none did.
        for i in range(first, len(self.ids)):
            prefix = self._decode(self.ids[: i + 1])
            at = min((prefix.find(s) for s in self.stops if s in prefix), default=-1)
            if at != -1:
                del self.ids[i + 1:]
                del self.logprobs[i + 1:]
                del self.top[i + 1:]
                self.text = prefix[:at]
                return i
        return None  # unreachable: the whole text held a stop

    def _delta(self, any_new: bool) -> StreamDelta | None:
        text = self.text
        if not self.finished:
            end = len(text) - self.hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            piece = text[self.emitted:max(end, self.emitted)]
            self.emitted += len(piece)
            return StreamDelta(text=piece, index=self.index) if (piece or any_new) else None
        piece = text[self.emitted:]
        self.emitted = len(text)
        return StreamDelta(text=piece, finish_reason=self.finish_reason, completion=self.completion(),
                           index=self.index)

    def completion(self) -> Completion:
        texts = self.tokenizer.batch_decode([[t] for t in self.ids]) if self.ids else []
        top: tuple[tuple[tuple[str, float], ...], ...] = ()
        if self.top:
            alt = sorted({t for row in self.top for t, _ in row})
            names = dict(zip(alt, self.tokenizer.batch_decode([[t] for t in alt])))
            top = tuple(tuple((names[t], lp) for t, lp in row) for row in self.top[:len(self.ids)])
        return Completion(
            text=self.text,
            token_ids=tuple(self.ids),
            token_logprobs=tuple(self.logprobs),
            prompt_tokens=len(self.admission.prompt_ids),
            completion_tokens=len(self.ids),
            finish_reason=self.finish_reason or "length",
            token_texts=tuple(texts),
            top_logprobs=top,
            index=self.index,
        )


class Choices:
    """The `n` choices of one request, one `OutputState` each. Deltas carry their choice's
    `index`; the last choice to finish gives the request's final delta, whose `completion` holds
    every choice (choice 0, the others in `others`). With n = 1 it is one `OutputState`."""

    def __init__(self, tokenizer, admission: Admission):
        n = admission.request.params.n
        self.outs = [OutputState(tokenizer, admission, i) for i in range(n)]
        self.reported = False  # the final delta went out (static engines' bookkeeping)

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outs)

    def add(self, index: int, ids: Sequence[int], logprobs: Sequence[float],
            finish_reason: str | None = None, top: Sequence[TopLogprobs] = ()) -> StreamDelta | None:
        delta = self.outs[index].add(ids, logprobs, finish_reason, top)
        if delta is None or delta.completion is None or len(self.outs) == 1:
            return delta
        if not self.finished:  # this choice is done; the request goes on
            return StreamDelta(text=delta.text, index=index)
        first, *rest = (o.completion() for o in self.outs)
        return dataclasses.replace(delta, completion=dataclasses.replace(first, others=tuple(rest)))


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's eos and the generation config's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError("the model declares no eos token; cannot tell when an answer ends")
    return frozenset(ids)


def token_finish(token: int, generated: int, max_tokens: int, eos_ids: frozenset[int],
                 params) -> str | None:
    """The token-level finish rule shared by the engines, after `generated` tokens including
    `token`: an eos or stop token id ends with "stop" (unless ignore_eos, and never before
    min_tokens), reaching max_tokens ends with "length"."""
    if generated >= params.min_tokens:
        if token in params.stop_token_ids or (token in eos_ids and not params.ignore_eos):
            return "stop"
    if generated >= max_tokens:
        return "length"
    return None
