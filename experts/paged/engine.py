"""`PagedEngine`: the continuous-batching engine behind the `Engine` contract.

A loop thread owns the model: it takes new and aborted requests from an inbox, runs
`EngineCore.step()` (schedule, run, account) and hands each step's tokens to the requests' event
loops in one call. The async side turns tokens into deltas (`OutputState`: text, stop
sequences), so the loop thread never detokenizes; a stream that finds a stop sequence, or whose
caller goes away, aborts its sequence and its pages are freed before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from frugalserve.experts.engine import (
    Admission,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptTooLongError,
    StreamDelta,
)
from frugalserve.experts.engine_config import (
    DEFAULT_ADMISSION_DELAY_S,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCHED_TOKENS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MEMORY_FRACTION,
    DEFAULT_PAGE_SIZE,
    DEFAULT_STREAM_INTERVAL_S,
    kv_cache_dtype_name,
)
from frugalserve.experts.memory import (
    BYTES_IN_USE,
    KV_BYTES_PER_TOKEN,
    REQUESTS_IN_FLIGHT,
    TOKENS_IN_FLIGHT,
    USABLE_BYTES,
    InsufficientMemoryError,
    MemoryProfile,
    estimate_activation_bytes_per_token,
    weight_bytes,
)
from frugalserve.experts.output import Choices, eos_token_ids
from frugalserve.experts.paged.block_manager import BlockManager
from frugalserve.experts.paged.core import EngineCore, TokenOutput
from frugalserve.experts.paged.kv_scales import (
    calibrate_kv_scales,
    calibration_prompts,
    resolve_kv_dtype,
)
from frugalserve.experts.paged.models import PagedModel, paged_model_for
from frugalserve.experts.paged.runner import ModelRunner, cache_pages
from frugalserve.experts.paged.scheduler import Scheduled, SchedulerConfig, Step
from frugalserve.experts.paged.sequence import Sequence
from frugalserve.experts.sampling import RowState, check_params, row_state
from frugalserve.experts.structured import Grammars
from frugalserve.experts.transformers_engine import (
    load_model,
    model_context_limit,
    model_parameters,
)

if TYPE_CHECKING:  # the spec is pydantic; the engine's import chain is not (the GPU image has no pydantic)
    from frugalserve.experts.spec import EngineSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PagedConfig:
    """The paged engine's knobs: the engine spec's `scheduler` and `kv_cache` sections, whose
    defaults these are."""

    max_num_seqs: int = DEFAULT_MAX_BATCH_SIZE
    max_num_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS
    admission_delay_s: float = DEFAULT_ADMISSION_DELAY_S
    page_size: int = DEFAULT_PAGE_SIZE
    # share of the replica's memory weights + cache + activations take
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    memory_budget_bytes: int | None = None  # instead of the device's memory (x gpu_share)
    gpu_share: float = 1.0  # the replica's fraction of its GPU (Ray's num_gpus)
    cuda_graphs: bool = DEFAULT_CUDA_GRAPHS
    # streamed tokens are handed over in chunks of this period
    stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S
    # what the cache stores: auto (the model's dtype), its name, or fp8 (e4m3, scales calibrated at load)
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype_name(self.kv_cache_dtype))

    @classmethod
    def from_spec(cls, spec: EngineSpec, gpu_share: float = 1.0) -> PagedConfig:
        s, kv = spec.scheduler, spec.kv_cache
        return cls(max_num_seqs=s.max_batch_size, max_num_batched_tokens=s.max_batched_tokens,
                   admission_delay_s=s.admission_delay_s, stream_interval_s=s.stream_interval_s,
                   page_size=kv.page_size, memory_fraction=kv.memory_fraction,
                   memory_budget_bytes=kv.memory_budget_bytes, gpu_share=gpu_share,
                   cuda_graphs=kv.cuda_graphs and spec.quantization == "none", kv_cache_dtype=kv.dtype)


@dataclass
class _Stream:
    """Tokens on their way from the loop thread to one request's consumer. The loop thread
    hands over a sequence's new tokens at its first token, at its end, and otherwise at most
    every `stream_interval_s` (never, for a `final_only` consumer without stop sequences): each
    hand-over wakes the consumer, and a wake per token per request would cost more host time
    than the model's step at large batches."""

    loop: asyncio.AbstractEventLoop
    index: int = 0  # the request's choice this sequence is (n > 1: one _Stream per choice)
    final_only: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)  # the request's, shared
    # (choice, tokens, logprobs, finish reason, top logprobs), appended by the loop's hand-over
    items: list[tuple[int, list[int], list[float], str | None, list]] = field(default_factory=list)
    error: BaseException | None = None
    delivered: int = 0  # generated tokens handed over so far (loop thread)
    last: float = 0.0  # when they were (loop thread)


class PagedEngine(Engine):
    batches_itself = True

    def __init__(self, model, tokenizer, *, config: PagedConfig = PagedConfig(),
                 max_context: int | None = None, name: str = "",
                 default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 quantization: str = "none", paged: PagedModel | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "model")
        limit = model_context_limit(model.config)
        self._max_context = min(max_context or limit, limit)
        self.default_max_tokens = default_max_tokens
        self.quantization = quantization
        self.adapters: tuple[str, ...] = ()
        self.config = config
        self.num_parameters = model_parameters(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)
        self.paged = paged or paged_model_for(model, self._max_context)
        self.device = self.paged.device
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.paged.dtype)
        self.kv_scales = self._calibrate() if self.kv_dtype == torch.float8_e4m3fn else None
        self._weights = weight_bytes(model)
        sched = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                config.admission_delay_s)
        budget, reserved, activation = self._size_memory(config)
        num_pages = cache_pages(self.paged, config.page_size, max_num_seqs=config.max_num_seqs,
                                max_context=self._max_context, budget_bytes=budget,
                                reserved_bytes=reserved, kv_dtype=self.kv_dtype)
        if num_pages < 2:  # the scratch page and one more; admission refuses what cannot fit
            raise InsufficientMemoryError(
                f"{self.name}: {budget / 2**20:.0f} MiB budget leaves no room for a KV cache after "
                f"{reserved / 2**20:.0f} MiB of weights and activations; raise memory_fraction or "
                "the budget, or quantize the weights")
        self.blocks = BlockManager(num_pages, config.page_size)
        self.runner = ModelRunner(self.paged, self.blocks, max_num_seqs=config.max_num_seqs,
                                  max_context=self._max_context, eos_ids=self.eos_ids,
                                  cuda_graphs=config.cuda_graphs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  kv_dtype=self.kv_dtype, kv_scales=self.kv_scales)
        self.core = EngineCore(self.runner, sched, self.blocks, self.eos_ids)
        self._profile = self._memory_profile(budget, activation)
        self._ids = itertools.count()
        self._streams: dict[int, _Stream] = {}
        self._by_request: dict[str, list[Sequence]] = {}
        self._inbox: list[tuple[str, Sequence]] = []
        self._cv = threading.Condition()
        self._closed = False
        self.cancelled_total = 0
        self.step_sizes: deque[int] = deque(maxlen=100_000)  # sequences per step, recent steps
        self._undrained: deque[int] = deque(maxlen=10_000)  # ... not yet taken by drain_step_sizes
        self.mixed_steps = 0  # steps that prefilled newcomers while others decoded
        self._peak_tokens = 0
        self._snapshot = self._take_snapshot()
        self._thread = threading.Thread(target=self._loop, name=f"paged-engine-{self.name}",
                                        daemon=True)
        self._thread.start()
        logger.info("paged engine %s: %d pages of %d tokens (%.1f MiB), attention %s",
                    self.name, num_pages, config.page_size, self.runner.cache_bytes / 2**20,
                    self.runner.attention)

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                  quantization: str = "none", double_quant: bool = True, **kwargs) -> PagedEngine:
        model, tokenizer = load_model(path, device=device, dtype=dtype, quantization=quantization,
                                      double_quant=double_quant)
        kwargs.setdefault("name", Path(path).name)
        if quantization != "none":
            config = kwargs.get("config", PagedConfig())
            kwargs["config"] = PagedConfig(**{**config.__dict__, "cuda_graphs": False})
        return cls(model, tokenizer, quantization=quantization, **kwargs)

    # -- fp8 scales ------------------------------------------------------------------------

    def _calibrate(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K/V scales from a prefill of the built-in calibration prompts (kv_scales.py)."""
        prompts = calibration_prompts(self.tokenizer, self.vocab_size, min(256, self._max_context))
        k, v = calibrate_kv_scales(self.paged, prompts)
        logger.info("paged engine %s: fp8 KV cache, scales calibrated on %d prompts (%d tokens): K %.3g..%.3g, "
                    "V %.3g..%.3g", self.name, len(prompts), sum(map(len, prompts)),
                    min(float(s.min()) for s in k), max(float(s.max()) for s in k),
                    min(float(s.min()) for s in v), max(float(s.max()) for s in v))
        return k, v

    # -- memory ----------------------------------------------------------------------------

    def _size_memory(self, config: PagedConfig) -> tuple[float, float, float]:
        """(budget, bytes taken before the cache, activation bytes per token)."""
        dev = self.device
        if config.memory_budget_bytes:
            total = float(config.memory_budget_bytes)
        elif dev.type == "cuda":
            total = torch.cuda.mem_get_info(dev)[1] * min(1.0, max(config.gpu_share, 1e-6))
        else:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        budget = total * config.memory_fraction
        dtype_bytes = torch.empty((), dtype=self.paged.dtype).element_size()
        if dev.type != "cuda":
            # As the static engine's profile: weights come off the budget, the rest is the cache
            # (a step's activations are transient and small beside a CPU replica's memory).
            act = estimate_activation_bytes_per_token(self.model.config, dtype_bytes)
            return budget, float(self._weights), act
        peak = self._profile_step(config)
        act = max(0.0, peak - self._weights) / config.max_num_batched_tokens
        # CUDA graphs and the allocator's slack: a margin of 5 % over the measured peak.
        return budget, peak * 1.05, act

    def _profile_step(self, config: PagedConfig) -> float:
        """Run the largest prefill a step may hold on a throw-away cache; the allocator's peak
        is what weights + activations take (compiles the kernels on the way)."""
        dev = self.device
        n = max(1, min(config.max_num_batched_tokens, self._max_context - 1))
        blocks = BlockManager(math.ceil(n / config.page_size) + 1, config.page_size)
        runner = ModelRunner(self.paged, blocks, max_num_seqs=1, max_context=self._max_context,
                             eos_ids=self.eos_ids, cuda_graphs=False, kv_dtype=self.kv_dtype,
                             kv_scales=self.kv_scales)
        seq = Sequence(-1, [1] * n, n, 1)
        blocks.allocate(seq, n)
        step = Step(prefills=[Scheduled(seq, 0, n, sample=True)])
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        runner.execute(step)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_reserved(dev) - runner.cache_bytes
        del runner, blocks
        torch.cuda.empty_cache()
        return float(peak)

    def _memory_profile(self, budget: float, activation: float) -> MemoryProfile:
        m, page, kv = self.paged, self.config.page_size, self.kv_dtype
        per_token = ModelRunner.page_bytes(m, page, kv) / page
        cache = self.runner.cache_bytes
        dtype_bytes = kv.itemsize  # fp8: 1, half of bf16
        analytic = m.num_layers * m.num_kv_heads * m.head_dim * 2 * dtype_bytes
        return MemoryProfile(
            model=self.name, device=str(self.device), dtype=str(m.dtype).removeprefix("torch."),
            weight_bytes=self._weights, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, kv_bytes_per_token_analytic=analytic,
            kv_bytes_per_token_measured=cache / (self.blocks.num_pages * page),
            kv_measure_method="paged-cache", kv_layout_factor=round(per_token / analytic, 4),
            activation_bytes_per_token=activation,
            activation_method="cuda-peak" if self.device.type == "cuda" else "estimate",
            kv_bytes_per_token=per_token, total_bytes=int(budget / self.config.memory_fraction),
            total_source="budget" if self.config.memory_budget_bytes else (
                "cuda" if self.device.type == "cuda" else "ram"),
            memory_fraction=self.config.memory_fraction,
            usable_bytes=int(ModelRunner.page_bytes(m, page, kv) * self.blocks.num_usable),
            token_capacity=self.blocks.num_usable * page,
            kv_cache_dtype=str(kv).removeprefix("torch."),
        )

    # -- contract --------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self._max_context

    def info(self) -> EngineInfo:
        c = self.config
        return EngineInfo(
            name=self.name, engine="transformers", batching="continuous", device=str(self.device),
            dtype=str(self.paged.dtype).removeprefix("torch."),
            num_parameters=self.num_parameters, max_context=self._max_context,
            default_max_tokens=self.default_max_tokens, attention=dict(self.runner.attention),
            quantization=self.quantization,
            details={"family": self.paged.family, "page_size": c.page_size,
                     "num_pages": self.blocks.num_pages, "cache_bytes": self.runner.cache_bytes,
                     "max_num_seqs": c.max_num_seqs,
                     "max_num_batched_tokens": c.max_num_batched_tokens,
                     "admission_delay_s": c.admission_delay_s,
                     "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch.")},
        )

    def admit(self, request: GenerationRequest) -> Admission:
        admission = super().admit(request)
        check_params(request.params, self.vocab_size, self.grammars, self.name)
        need = len(admission.prompt_ids) + admission.max_tokens - 1
        capacity = self.blocks.num_usable * self.blocks.page_size
        if need > capacity:
            raise PromptTooLongError(
                f"the request needs {need} tokens of KV cache, but this replica's cache holds "
                f"{capacity}; shorten the prompt or lower max_tokens")
        return admission

    def cancel(self, request_id: str) -> None:
        for seq in self._by_request.get(request_id, ()):
            self._post("abort", seq)

    def _sequences(self, admission: Admission) -> list[Sequence]:
        """One sequence per choice (n > 1: admitted together, so they batch together)."""
        seqs = []
        for k in range(admission.request.params.n):
            params = admission.request.params.for_choice(k)
            tokens = list(admission.prompt_ids)
            state = row_state(params, tokens, len(tokens), self.grammars, self.device)
            seqs.append(Sequence(next(self._ids), tokens, len(tokens), admission.max_tokens,
                                 params=params, generator=state, arrival=time.monotonic()))
        return seqs

    async def stream(self, admission: Admission, *, final_only: bool = False,
                     ) -> AsyncIterator[StreamDelta]:
        req = admission.request
        seqs = self._sequences(admission)
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        streams = [_Stream(loop, k, final_only=final_only and not req.params.stop, event=event)
                   for k in range(len(seqs))]
        for seq, st in zip(seqs, streams):
            self._streams[seq.seq_id] = st
        if req.request_id:
            self._by_request[req.request_id] = seqs
        out = Choices(self.tokenizer, admission)
        engine_done = [False] * len(seqs)  # the engine finished a sequence (and freed its pages)
        for seq in seqs:
            self._post("add", seq)
        try:
            while not out.finished:
                await event.wait()
                event.clear()
                for st in streams:
                    items, st.items = st.items, []
                    if st.error is not None:
                        raise st.error
                    if not items or out.outs[st.index].finished:
                        continue
                    engine_done[st.index] = items[-1][3] is not None
                    ids = [t for _, chunk, _, _, _ in items for t in chunk]
                    lps = [lp for _, _, chunk, _, _ in items for lp in chunk]
                    top = [row for *_, chunk in items for row in chunk]
                    delta = out.add(st.index, ids, lps, items[-1][3], top)
                    k = st.index
                    if out.outs[k].finished and not engine_done[k] and len(seqs) > 1:
                        self._post("abort", seqs[k])  # cut at a stop sequence: free it now
                        engine_done[k] = True
                    if delta is not None:
                        yield delta
        finally:
            for seq, done, choice in zip(seqs, engine_done, out.outs):
                if not done:  # cancelled, failed, or cut at a stop sequence
                    self._post("abort", seq)
                    if not choice.finished:
                        self.cancelled_total += 1
                self._streams.pop(seq.seq_id, None)
            if req.request_id and self._by_request.get(req.request_id) is seqs:
                del self._by_request[req.request_id]

    def stats(self) -> dict[str, Any]:
        core, runner, s = self.core, self.runner, self._snapshot
        return {
            "steps": core.steps,
            "seqs_per_step_total": core.seqs_per_step_total,
            "mean_running_batch": core.seqs_per_step_total / core.steps if core.steps else 0.0,
            "max_running_batch": core.max_seqs_in_step,
            "step_sizes": list(self.step_sizes),
            "mixed_steps": self.mixed_steps,
            "graph_steps": runner.graph_steps,
            "eager_steps": runner.eager_steps,
            "preemptions": core.scheduler.preemptions,
            "cancelled": self.cancelled_total,
            "tokens": {"tokens_in_flight": s["running_tokens"] + s["waiting_tokens"],
                       "peak_tokens": self._peak_tokens},
            **s,
        }

    def drain_step_sizes(self) -> list[int]:
        out = []
        while self._undrained:  # deque append/popleft are atomic: safe beside the loop thread
            out.append(self._undrained.popleft())
        return out

    def memory_profile(self) -> MemoryProfile:
        return self._profile

    def load_stats(self) -> dict[str, float]:
        s = self._snapshot
        per_token = self._profile.kv_bytes_per_token
        page_bytes = per_token * self.blocks.page_size
        return {
            BYTES_IN_USE: float(s["pages_used"] * page_bytes + s["waiting_tokens"] * per_token),
            USABLE_BYTES: float(self._profile.usable_bytes),
            TOKENS_IN_FLIGHT: float(s["running_tokens"] + s["waiting_tokens"]),
            REQUESTS_IN_FLIGHT: float(s["running"] + s["waiting"]),
            KV_BYTES_PER_TOKEN: float(per_token),
        }

    def weight_bytes(self) -> float:
        return float(self._weights)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the loop thread -------------------------------------------------------------------

    def _post(self, op: str, seq: Sequence) -> None:
        with self._cv:
            self._inbox.append((op, seq))
            self._cv.notify()

    def _take_snapshot(self) -> dict[str, int]:
        sched = self.core.scheduler
        tokens = sum(len(s.tokens) for s in sched.running) + sum(len(s.tokens) for s in sched.waiting)
        self._peak_tokens = max(self._peak_tokens, tokens)
        return {
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "running_tokens": sum(s.num_computed for s in sched.running),
            "waiting_tokens": sum(len(s.tokens) for s in sched.waiting),
            "pages_used": self.blocks.num_used,
            "pages_total": self.blocks.num_usable,
        }

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._inbox and not self.core.has_work():
                    self._cv.wait()
                if self._closed:
                    return
                inbox, self._inbox = self._inbox, []
            for op, seq in inbox:
                if op == "add":
                    self.core.add(seq)
                elif self.core.abort(seq):
                    pass  # its pages are free; its stream is gone
            if not self.core.has_work():
                self._snapshot = self._take_snapshot()
                continue
            try:
                outputs = self.core.step(now=time.monotonic(), on_step=self._note_step)
            except Exception as exc:  # noqa: BLE001 - every request in flight learns why
                logger.exception("paged engine %s: step failed", self.name)
                self._fail_all(exc)
                continue
            self._snapshot = self._take_snapshot()
            self._deliver(outputs)

    def _note_step(self, step: Step) -> None:
        n = len(step.decodes) + len(step.prefills)
        self.step_sizes.append(n)
        self._undrained.append(n)
        if step.decodes and step.prefills:
            self.mixed_steps += 1

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        now, interval = time.monotonic(), self.config.stream_interval_s
        for out in outputs:
            st = self._streams.get(out.seq.seq_id)
            if st is None:
                continue
            seq = out.seq
            if out.finish_reason is None and (st.final_only or (
                    st.delivered and now - st.last < interval)):
                continue  # held: handed over with the next batch of this sequence's tokens
            start = st.delivered
            st.delivered, st.last = seq.num_generated, now
            top = seq.generator.top[start:] if isinstance(seq.generator, RowState) else []
            item = (st.index, seq.tokens[seq.num_prompt + start:], seq.logprobs[start:],
                    out.finish_reason, top)
            by_loop.setdefault(st.loop, []).append((st, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # that event loop is closed: its requests are gone
                pass

    def _fail_all(self, exc: Exception) -> None:
        sched = self.core.scheduler
        for seq in [*sched.running, *sched.waiting]:
            sched.abort(seq)
            st = self._streams.get(seq.seq_id)
            if st is not None:
                try:
                    st.loop.call_soon_threadsafe(_fail, st, exc)
                except RuntimeError:  # that event loop is closed
                    pass


def _hand_over(items: list[tuple[_Stream, tuple[int, list[int], list[float], str | None, list]]],
               ) -> None:
    for st, item in items:
        st.items.append(item)
        st.event.set()


def _fail(st: _Stream, exc: Exception) -> None:
    st.error = RuntimeError(f"the engine failed: {type(exc).__name__}: {exc}")
    st.event.set()

