"""The synchronous heart of the paged engine: schedule a step, run it, account it.

No asyncio and no threads here: `PagedEngine` drives `EngineCore.step()` from its loop thread,
and tests drive it directly with a fake runner. A runner takes a `Step` and returns the sampled
token and its logprob for every scheduled sequence whose `sample` flag is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from frugalserve.experts.output import token_finish
from frugalserve.experts.paged.block_manager import BlockManager
from frugalserve.experts.paged.scheduler import Scheduler, SchedulerConfig, Step
from frugalserve.experts.paged.sequence import Sequence


class Runner(Protocol):
    def execute(self, step: Step) -> dict[int, tuple[int, float]]:
        """Compute the step's tokens; for each sequence that samples: (token, logprob)."""
        ...


@dataclass(frozen=True)
class TokenOutput:
    seq: Sequence
    token: int
    logprob: float
    finish_reason: str | None


class EngineCore:
    def __init__(self, runner: Runner, config: SchedulerConfig, blocks: BlockManager,
                 eos_ids: frozenset[int]):
        self.runner = runner
        self.blocks = blocks
        self.scheduler = Scheduler(config, blocks)
        self.eos_ids = eos_ids
        self.steps = 0
        self.tokens_computed = 0
        self.seqs_per_step_total = 0  # sum over steps of sequences in the step
        self.max_seqs_in_step = 0

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> bool:
        return self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _finish(self, seq: Sequence, token: int) -> str | None:
        return token_finish(token, seq.num_generated, seq.max_tokens, self.eos_ids, seq.params)

    def step(self, now: float = 0.0, on_step: Callable[[Step], None] | None = None,
             ) -> list[TokenOutput]:
        """One engine step at time `now`; the tokens it sampled."""
        step = self.scheduler.schedule(now)
        if not step:
            return []
        if on_step is not None:
            on_step(step)
        sampled = self.runner.execute(step)
        self.scheduler.finish_step(step, sampled, self.eos_ids, self._finish)
        n = len(step.scheduled)
        self.steps += 1
        self.tokens_computed += step.num_tokens
        self.seqs_per_step_total += n
        self.max_seqs_in_step = max(self.max_seqs_in_step, n)
        outputs = []
        for s in step.scheduled:
            if s.sample and s.seq.seq_id in sampled:
                token, logprob = sampled[s.seq.seq_id]
                outputs.append(TokenOutput(s.seq, token, logprob, s.seq.finish_reason))
        return outputs
