"""One request inside the paged engine: its tokens, what of them is cached, and its pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from frugalserve.experts.engine import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its cache dropped, to be recomputed)
    RUNNING = "running"  # holds pages; prefilling (in chunks) or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`tokens` is prompt + generated; the first `num_computed` of them have K/V in `pages`.
    Each step computes the next few uncached tokens; once all are cached the step samples one
    more token, which the next step computes (decode)."""

    seq_id: int
    tokens: list[int]
    num_prompt: int
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    # the sampler's RowState (frugalserve.experts.sampling): seeded generator, grammar, top
    # logprobs; None for a plain greedy sequence
    generator: Any = None
    status: Status = Status.WAITING
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    preemptions: int = 0
    arrival: float = 0.0  # when it was added (time.monotonic()), for the admission delay

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def max_total_tokens(self) -> int:
        """Tokens this sequence may ever hold in the cache (its last sampled token is never fed
        back, so prompt + max_tokens - 1 suffices)."""
        return self.num_prompt + self.max_tokens - 1
