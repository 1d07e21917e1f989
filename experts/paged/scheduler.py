"""Who runs in the next step: continuous batching under a token budget and a page budget.

Every step (vLLM's unified scheduling, nano-vllm's shape):
1. running sequences that decode get their one token each, oldest first;
2. running sequences still prefilling (long prompts in chunks, or a preempted sequence being
   recomputed) get the next chunk that fits the step's token budget;
3. waiting sequences are admitted in arrival order (FIFO: the head is never overtaken) while the
   token budget, `max_num_seqs` and free pages allow; a prompt longer than what is left of the
   budget starts with a chunk, so one long prompt never stalls everybody's decoding.
When a running sequence needs a page and none is free, the newest running sequence is preempted:
its pages are freed and it goes back to the front of the queue with its tokens, to be recomputed
later. Nothing is ever dropped. The scheduler is pure Python: tests drive it with a fake model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from frugalserve.experts.engine_config import (
    DEFAULT_ADMISSION_DELAY_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCHED_TOKENS,
)
from frugalserve.experts.paged.block_manager import BlockManager
from frugalserve.experts.paged.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_MAX_BATCH_SIZE  # sequences running at once
    # tokens one step computes (prefill chunks + decodes)
    max_num_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS
    # While sequences decode, a newcomer waits up to this long so that several prefills share one
    # (eager, uncaptured) step instead of each interrupting the fast captured decode steps.
    admission_delay_s: float = DEFAULT_ADMISSION_DELAY_S

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.admission_delay_s < 0:
            raise ValueError(f"scheduler limits must be >= 1: {self}")


@dataclass(frozen=True)
class Scheduled:
    """`seq` computes tokens [start, start + n) this step; `sample`: and then draws its next one."""

    seq: Sequence
    start: int
    n: int
    sample: bool


@dataclass
class Step:
    decodes: list[Scheduled] = field(default_factory=list)  # n == 1, cached context before
    prefills: list[Scheduled] = field(default_factory=list)  # chunks of prompts / recomputes
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[Scheduled]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.n for s in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if not self.blocks.can_hold(seq):
            raise ValueError(f"sequence {seq.seq_id} may need {seq.max_total_tokens} tokens of KV "
                             f"cache; the cache holds {self.blocks.num_usable * self.blocks.page_size}")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> bool:
        """Drop `seq` wherever it is, freeing its pages; False if it was not here."""
        if seq.status is Status.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return False
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "cancelled"
        return True

    def schedule(self, now: float = 0.0) -> Step:
        """The next step at time `now` (seconds, the clock of `Sequence.arrival`)."""
        step = Step()
        budget = self.config.max_num_batched_tokens
        # 1-2: running sequences, decodes first; preemption takes the newest running sequence.
        for decoding in (True, False):
            for seq in list(self.running):
                if seq.status is not Status.RUNNING or budget == 0:
                    continue
                if (seq.num_uncomputed == 1) != decoding:
                    continue
                n = min(seq.num_uncomputed, budget)
                if not self._make_room(seq, n, step):
                    continue  # seq itself was preempted
                budget -= n
                self._put(step, seq, n)
        # 3: admit waiting sequences in order, unless this step had to preempt.
        if self._hold_admission(now, step):
            return step
        while (self.waiting and budget > 0 and not step.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if self.blocks.pages_needed(seq, n) > self.blocks.num_free:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            self._put(step, seq, n)
        return step

    def _hold_admission(self, now: float, step: Step) -> bool:
        """Let newcomers gather for a moment while others decode (see admission_delay_s)."""
        delay = self.config.admission_delay_s
        if not delay or not step.decodes or not self.waiting or step.prefills:
            return False
        room = self.config.max_num_seqs - len(self.running)
        return len(self.waiting) < room and now - self.waiting[0].arrival < delay

    def _make_room(self, seq: Sequence, n: int, step: Step) -> bool:
        """Free pages (preempting the newest running sequences) until `seq` can take `n` more
        tokens; False if `seq` had to be preempted itself."""
        while self.blocks.pages_needed(seq, n) > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)
        for group in (step.decodes, step.prefills):  # it may have been scheduled earlier
            group[:] = [s for s in group if s.seq is not seq]

    def _put(self, step: Step, seq: Sequence, n: int) -> None:
        self.blocks.allocate(seq, n)
        sample = seq.num_computed + n == len(seq.tokens)
        entry = Scheduled(seq, seq.num_computed, n, sample)
        # a decode: one new token after a cached context, sampled (the paged decode kernel)
        decode = n == 1 and seq.num_computed > 0 and sample
        (step.decodes if decode else step.prefills).append(entry)

    def finish_step(self, step: Step, sampled: dict[int, tuple[int, float]], eos_ids,
                    finish_rule) -> list[Sequence]:
        """Account a computed step: cached tokens advance; sampled tokens are appended and
        finished sequences leave (pages freed). `sampled[seq_id] = (token, logprob)`;
        `finish_rule(seq, token) -> reason | None`. Returns the sequences that finished."""
        finished = []
        for s in step.scheduled:
            seq = s.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed += s.n
            if not s.sample:
                continue
            token, logprob = sampled[seq.seq_id]
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            reason = finish_rule(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                seq.status = Status.FINISHED
                self.running.remove(seq)
                self.blocks.free(seq)
                finished.append(seq)
        return finished
