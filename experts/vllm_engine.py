"""The vLLM engine: an expert served by vLLM's AsyncLLM (vLLM 0.24.x or 0.33.x, the `vllm` extra;
what differs between them lives in `frugalserve.kernels.vllm_compat`).

vLLM batches by itself (continuous batching), so the deployment hands each request to `stream`
as it arrives; `_stream_many` merges the outputs of several requests as they arrive (each yielded
step holds whatever tokens arrived since the last one). Prompts are tokenized by the engine
contract's `admit` with the model's Hugging Face tokenizer (the same rules as the transformers
engines), so the context checks agree with what vLLM runs. Every token carries its logprob (`logprobs=0` asks vLLM for the sampled token's, which with
vLLM's default `raw_logprobs` mode is temperature-free, as in the transformers engine).

Only `VLLMEngine.from_spec` and the stat logger import vllm; the rest (options, engine arguments,
sampling arguments, output merging, memory facts, deployment resources) are pure functions that
run without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugalserve.experts.engine import (
    Admission,
    Completion,
    Engine,
    EngineInfo,
    SamplingParams,
    StreamDelta,
    UnknownAdapterError,
    UnsupportedFeatureError,
)
from frugalserve.experts.memory import (
    BYTES_IN_USE,
    KV_BYTES_PER_TOKEN,
    REQUESTS_IN_FLIGHT,
    TOKENS_IN_FLIGHT,
    USABLE_BYTES,
)
from frugalserve.experts.spec import (
    DEFAULT_MAX_TOKENS,
    EngineSpec,
    resolve_model_path,
    validate_vllm_options,
)

logger = logging.getLogger(__name__)


def engine_args_from_spec(spec: EngineSpec, name: str) -> dict[str, Any]:
    """Keyword arguments for vLLM's `AsyncEngineArgs` from expert `name`'s `EngineSpec`."""
    opts = validate_vllm_options(spec.vllm, name)
    if spec.device == "cpu":
        raise ValueError(f"expert {name!r}: backend 'vllm' runs on CUDA GPUs; device is 'cpu'")
    if opts.max_model_len and spec.max_context and opts.max_model_len != spec.max_context:
        raise ValueError(f"expert {name!r}: vllm.max_model_len ({opts.max_model_len}) and "
                         f"max_context ({spec.max_context}) disagree; set one")
    args: dict[str, Any] = {
        "model": str(spec.model_path),
        "served_model_name": name,
        "dtype": spec.dtype,
        "disable_log_stats": False,  # the KV-cache usage reaches memory_stats through a stat logger
        "enable_log_requests": False,
    }
    if spec.max_context:
        args["max_model_len"] = spec.max_context
    if (opts.tensor_parallel_size or 1) > 1:
        args["distributed_executor_backend"] = "ray"  # workers go into the replica's placement group
    if spec.quantization != "none":
        raise ValueError(f"expert {name!r}: quantization {spec.quantization!r} is the transformers "
                         "engine's bitsandbytes loader; for engine 'vllm' set vllm.quantization "
                         "(e.g. 'bitsandbytes', 'awq', 'fp8')")
    adapters = lora_adapters(spec)
    if adapters:
        args["enable_lora"] = True
        args["max_loras"] = len(adapters)
    if spec.kv_cache.dtype != "auto":
        mapped = {"fp8": "fp8", "bfloat16": "bfloat16"}.get(spec.kv_cache.dtype)
        if mapped is None:
            raise ValueError(f"expert {name!r}: kv_cache.dtype {spec.kv_cache.dtype!r} has no vLLM "
                             "kv_cache_dtype; use auto, bfloat16 or fp8")
        if opts.kv_cache_dtype and opts.kv_cache_dtype != mapped:
            raise ValueError(f"expert {name!r}: kv_cache.dtype ({spec.kv_cache.dtype}) and "
                             f"vllm.kv_cache_dtype ({opts.kv_cache_dtype}) disagree; set one")
        args["kv_cache_dtype"] = mapped
    args.update(opts.model_dump(exclude_none=True))
    if adapters and not args["enable_lora"]:
        raise ValueError(f"expert {name!r}: adapters need LoRA; vllm.enable_lora is false")
    return args


def lora_adapters(spec: EngineSpec) -> dict[str, tuple[int, str]]:
    """The spec's LoRA adapters as vLLM wants them: name -> (positive int id, folder)."""
    names = sorted(spec.adapters)
    return {n: (k + 1, str(resolve_model_path(spec.adapters[n]))) for k, n in enumerate(names)}


def deployment_resources(spec: EngineSpec, cpus: float, name: str = "",
                         gpus: float = 1.0) -> dict[str, Any]:
    """Serve deployment options that reserve the GPUs vLLM will use. TP 1: the replica holds
    `gpus` of one GPU (the deployment's `resources.num_gpus`; a fraction lets small experts share a
    GPU, and then vLLM must be told how much of it to take). TP > 1: one whole GPU per rank, in a
    STRICT_PACK placement group: the replica on a CPU bundle (`cpus`) and one single-GPU bundle per
    rank, which vLLM's Ray executor finds and uses."""
    opts = validate_vllm_options(spec.vllm, name)
    tp = opts.tensor_parallel_size or 1
    where = f"expert {name!r}: " if name else ""
    if tp == 1:
        if not 0 < gpus <= 1:
            raise ValueError(f"{where}a vLLM replica with tensor_parallel_size 1 takes a GPU or a "
                             f"fraction of one; deployment.resources.num_gpus is {gpus}")
        if gpus < 1:
            util = opts.gpu_memory_utilization
            if opts.kv_cache_memory_bytes is None and (util is None or util > gpus):
                raise ValueError(
                    f"{where}deployment.resources.num_gpus {gpus} shares the GPU, but vLLM would take "
                    f"{util if util is not None else 0.9} of its memory: set engine.vllm."
                    f"gpu_memory_utilization to at most {gpus}, or engine.vllm.kv_cache_memory_bytes")
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    return {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": cpus}] + [{"GPU": 1} for _ in range(tp)],
        "placement_group_strategy": "STRICT_PACK",
    }


def sampling_kwargs(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (output_kind DELTA is added by the engine;
    `structured_outputs` is a dict the engine turns into vLLM's `StructuredOutputsParams`)."""
    if params.n > 1:
        raise UnsupportedFeatureError("n > 1 is not wired to the vLLM engine yet (its outputs "
                                      "are merged per request, one choice each)", "n")
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": params.temperature,  # 0: greedy in vLLM too
        "top_p": params.top_p,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "max_tokens": max_tokens,
        "logprobs": params.top_logprobs,  # 0: the sampled token's logprob only
        "skip_special_tokens": True,
    }
    defaults = SamplingParams()
    for name in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "min_tokens", "ignore_eos"):
        if getattr(params, name) != getattr(defaults, name):
            kwargs[name] = getattr(params, name)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    if params.guide is not None:  # vLLM's own guided decoding
        kwargs["structured_outputs"] = (
            {"json": json.loads(params.guide.schema)} if params.guide.kind == "json_schema"
            and params.guide.schema is not None else {"json_object": True})
    return kwargs


# -- merging vLLM's per-request outputs into the Engine's step lists ----------------------------


@dataclass
class RequestState:
    """What one request has produced so far (vLLM outputs arrive as deltas)."""

    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    done: bool = False  # final delta (or cancellation) already reported


CANCELLED = object()  # posted for a request whose vLLM stream was cancelled


def _finish_reason(vllm_reason: str | None) -> str:
    if vllm_reason == "length":
        return "length"
    if vllm_reason == "error":
        raise RuntimeError("vLLM failed the request (finish_reason 'error')")
    return "stop"  # stop string, stop token, eos, repetition


def merge_outputs(states: list[RequestState], updates: Iterable[tuple[int, Any]]) -> list[StreamDelta | None]:
    """One Engine step from the vLLM outputs that arrived since the last: `updates` are
    (request index, RequestOutput in DELTA mode, or CANCELLED). Returns one slot per request:
    a delta while it runs (empty if nothing arrived), the final delta with the `Completion` once,
    None after (and for a cancelled or aborted request)."""
    fresh: dict[int, tuple[str, list[int], list[float]]] = {}
    finished: dict[int, str | None] = {}
    for i, out in updates:
        if out is CANCELLED:
            finished[i] = "abort"
            continue
        co = out.outputs[0]
        ids = list(co.token_ids)
        if ids and co.logprobs is None:
            raise ValueError("vLLM returned no logprobs; the engine asks for logprobs=0")
        lps, texts = [], []
        for tok, position in zip(ids, co.logprobs or ()):
            entry = position[tok]
            lps.append(float(entry.logprob))
            texts.append(entry.decoded_token or "")
        st = states[i]
        st.text += co.text
        st.token_ids += ids
        st.logprobs += lps
        st.token_texts += texts
        text, old_ids, old_lps = fresh.get(i, ("", [], []))
        fresh[i] = (text + co.text, old_ids + ids, old_lps + lps)
        if out.finished:
            finished[i] = co.finish_reason
    step: list[StreamDelta | None] = []
    for i, st in enumerate(states):
        if st.done:
            step.append(None)
            continue
        text, ids, lps = fresh.get(i, ("", [], []))
        if i not in finished:
            step.append(StreamDelta(text=text, token_ids=tuple(ids), token_logprobs=tuple(lps)))
            continue
        st.done = True
        if finished[i] == "abort":
            step.append(None)
            continue
        reason = _finish_reason(finished[i])
        completion = Completion(
            text=st.text, token_ids=tuple(st.token_ids), token_logprobs=tuple(st.logprobs),
            prompt_tokens=st.prompt_tokens, completion_tokens=len(st.token_ids),
            finish_reason=reason, token_texts=tuple(st.token_texts),
        )
        step.append(StreamDelta(text=text, token_ids=tuple(ids), token_logprobs=tuple(lps),
                                finish_reason=reason, completion=completion))
    return step


# -- memory ------------------------------------------------------------------------------------


def kv_memory_stats(*, num_blocks: int, block_size: int, bytes_per_token: int,
                    usage: float | None = None, running: int | None = None,
                    waiting: int | None = None) -> dict[str, float]:
    """Memory facts of a vLLM replica (per GPU rank): its KV cache and, when known, how full it is."""
    tokens = num_blocks * block_size
    stats = {
        "kv_cache_blocks": float(num_blocks),
        "kv_block_size_tokens": float(block_size),
        "kv_cache_tokens": float(tokens),
        "kv_bytes_per_token": float(bytes_per_token),
        "kv_cache_bytes": float(tokens * bytes_per_token),
    }
    if usage is not None:
        stats["kv_cache_usage"] = float(usage)  # share of KV blocks in use, 0..1
        stats["kv_cache_tokens_used"] = float(usage * tokens)
    if running is not None:
        stats["num_running_requests"] = float(running)
    if waiting is not None:
        stats["num_waiting_requests"] = float(waiting)
    return stats


def checkpoint_parameters(folder: str | Path) -> int:
    """Parameters in a model folder's safetensors files, read from their headers (no weights
    loaded): what the default per-token cost of an expert scales with."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(e["shape"]) for name, e in header.items() if name != "__metadata__")
    return total


def kv_load_stats(memory: dict[str, float]) -> dict[str, float]:
    """The autoscaling signal (`record_autoscaling_stats`) from vLLM's own KV cache: the bytes of
    the blocks in use, the cache's bytes as the usable bytes (vLLM sized it from its memory share),
    the tokens those blocks hold, requests running and waiting. Empty until vLLM's scheduler has
    reported once (Serve then holds the replica count)."""
    if "kv_cache_usage" not in memory:
        return {}
    return {
        BYTES_IN_USE: memory["kv_cache_usage"] * memory["kv_cache_bytes"],
        USABLE_BYTES: memory["kv_cache_bytes"],
        TOKENS_IN_FLIGHT: memory["kv_cache_tokens_used"],
        REQUESTS_IN_FLIGHT: memory.get("num_running_requests", 0.0)
        + memory.get("num_waiting_requests", 0.0),
        KV_BYTES_PER_TOKEN: memory["kv_bytes_per_token"],
    }


@dataclass
class _SchedulerSnapshot:
    usage: float | None = None
    running: int | None = None
    waiting: int | None = None


def _stat_logger_factory(snapshot: _SchedulerSnapshot):
    """A vLLM stat logger (per-engine factory) that keeps the latest scheduler stats."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Snapshot(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                snapshot.usage = scheduler_stats.kv_cache_usage
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self):
            pass

    return _Snapshot


def ray_stat_loggers() -> list:
    """vLLM's Ray stat logger, so its metrics export through Ray as `ray_vllm_*` (as under Ray
    Serve LLM); none where this vLLM has no such logger."""
    try:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError as exc:  # a vLLM without the Ray wrappers: its own series stay in-process
        logger.warning("vLLM's Ray stat logger is unavailable (%s): no ray_vllm_* series", exc)
        return []
    return [RayPrometheusStatLogger]


# -- the engine --------------------------------------------------------------------------------


class VLLMEngine(Engine):
    # vLLM schedules continuously: a deployment should hand it requests as they come (one
    # `stream` each) rather than wait for the previous `stream_batch` to end.
    batches_itself = True

    def __init__(self, llm, tokenizer, *, max_context: int, name: str = "",
                 default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 attention_backend: str = "vllm", snapshot: _SchedulerSnapshot | None = None):
        self.llm = llm  # vllm.v1.engine.async_llm.AsyncLLM
        self.tokenizer = tokenizer
        self.name = name or "model"
        self._max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.attention_backend = attention_backend
        self.batch_sizes: list[int] = []
        self.cancelled_total = 0
        self._snapshot = snapshot or _SchedulerSnapshot()
        self._tasks: dict[str, list[asyncio.Task]] = {}  # request_id -> its vLLM streams
        self.adapters: dict[str, tuple[int, str]] = {}  # LoRA name -> (vLLM id, folder)
        self.num_parameters = 0  # from the checkpoint (from_spec): the default cost scales with it

    @classmethod
    def from_spec(cls, spec: EngineSpec, name: str) -> VLLMEngine:
        from frugalserve.kernels.vllm_compat import import_vllm
        from transformers import AutoTokenizer

        import_vllm()  # a supported release, or an error naming them
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_args_from_spec(spec, name)
        backend = kwargs.get("attention_backend") or "vllm-auto"
        if backend == "CUSTOM":  # the entry point does this in vLLM's processes; here too, early
            from frugalserve.kernels.vllm_backend import register

            register()
            backend = "frugalserve-triton (vLLM CUSTOM)"
        snapshot = _SchedulerSnapshot()
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs),
                                        stat_loggers=[_stat_logger_factory(snapshot),
                                                      *ray_stat_loggers()])
        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        engine = cls(llm, tokenizer, max_context=llm.model_config.max_model_len, name=name,
                     default_max_tokens=spec.max_tokens_default, attention_backend=backend,
                     snapshot=snapshot)
        engine.adapters = lora_adapters(spec)
        engine.num_parameters = checkpoint_parameters(spec.model_path)
        logger.info("vLLM engine for %s: %s (attention: %s)", name, kwargs, backend)
        return engine

    @property
    def max_context(self) -> int:
        return self._max_context

    def info(self) -> EngineInfo:
        cfg = self.llm.model_config
        return EngineInfo(
            name=self.name, engine="vllm", batching="continuous", device="cuda",
            dtype=str(cfg.dtype).removeprefix("torch."), num_parameters=self.num_parameters,
            max_context=self._max_context, default_max_tokens=self.default_max_tokens,
            attention={"attention": self.attention_backend}, adapters=tuple(sorted(self.adapters)),
        )

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "cancelled": self.cancelled_total,
                "memory": self.memory_stats()}

    async def stream(self, admission: Admission, *, final_only: bool = False,
                     ) -> AsyncIterator[StreamDelta]:
        async for step in self._stream_many([admission]):
            if step[0] is not None:
                yield step[0]

    def cancel(self, request_id: str) -> None:
        """The caller went away: cancel its vLLM stream (vLLM aborts the request on cancellation)."""
        if request_id:
            for task in self._tasks.get(request_id, ()):
                task.cancel()

    async def _stream_many(self, admissions: Sequence[Admission]) -> AsyncIterator[list[StreamDelta | None]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        requests = [a.request for a in admissions]
        prompts = [list(a.prompt_ids) for a in admissions]
        budgets = [a.max_tokens for a in admissions]
        loras = [self._lora_request(getattr(r, "adapter", None)) for r in requests]
        self.batch_sizes.append(len(requests))
        states = [RequestState(prompt_tokens=len(p)) for p in prompts]
        queue: asyncio.Queue = asyncio.Queue()
        tasks = []
        for i, (r, p, budget, lora) in enumerate(zip(requests, prompts, budgets, loras)):
            kwargs = sampling_kwargs(r.params, budget)
            if "structured_outputs" in kwargs:
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
            params = VSamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
            vllm_id = f"{r.request_id or 'req'}-{uuid.uuid4().hex[:12]}"  # unique across batches
            task = asyncio.create_task(
                self._pump(i, TokensPrompt(prompt_token_ids=p), params, vllm_id, queue, lora))
            # A callback, not an except clause: a task cancelled before it starts runs no code.
            task.add_done_callback(lambda t, i=i: t.cancelled() and queue.put_nowait((i, CANCELLED)))
            tasks.append(task)
            if r.request_id:
                self._tasks.setdefault(r.request_id, []).append(task)
        try:
            live = len(requests)
            while live:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                updates = []
                for i, item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:  # the stream ended
                        live -= 1
                        continue
                    if item is CANCELLED:
                        self.cancelled_total += 1
                        live -= 1
                    updates.append((i, item))
                if updates:
                    yield merge_outputs(states, updates)
        finally:
            for r, task in zip(requests, tasks):
                task.cancel()  # no-op for finished streams; aborts the rest in vLLM
                if not r.request_id:
                    continue
                left = [t for t in self._tasks.get(r.request_id, []) if t is not task]
                if left:
                    self._tasks[r.request_id] = left
                else:
                    self._tasks.pop(r.request_id, None)

    def _lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        if adapter not in self.adapters:
            raise UnknownAdapterError(f"model {self.name!r} has no adapter {adapter!r}; it has "
                                      f"{sorted(self.adapters)}")
        from vllm.lora.request import LoRARequest

        lora_id, path = self.adapters[adapter]
        return LoRARequest(lora_name=adapter, lora_int_id=lora_id, lora_path=path)

    async def _pump(self, i: int, prompt, params, vllm_id: str, queue: asyncio.Queue, lora=None) -> None:
        """Forward one vLLM request's outputs to the batch's queue: (i, output)..., then (i, None)."""
        try:
            async for out in self.llm.generate(prompt, params, vllm_id, lora_request=lora):
                queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise  # vLLM aborts the request; the task's done callback posts CANCELLED
        except Exception as exc:  # surfaced by stream_batch
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    def load_stats(self) -> dict[str, float]:
        return kv_load_stats(self.memory_stats())

    def memory_stats(self) -> dict[str, float]:
        from vllm.utils.torch_utils import get_kv_cache_torch_dtype

        cfg = self.llm.vllm_config
        model, parallel, cache = cfg.model_config, cfg.parallel_config, cfg.cache_config
        dtype = get_kv_cache_torch_dtype(cache.cache_dtype, model.dtype)
        elem = dtype.itemsize
        per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
                     * model.get_head_size() * elem)
        s = self._snapshot
        return kv_memory_stats(num_blocks=cache.num_gpu_blocks or 0, block_size=cache.block_size,
                               bytes_per_token=per_token, usage=s.usage, running=s.running,
                               waiting=s.waiting)
