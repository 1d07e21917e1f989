"""The expert deployment: one engine per replica, requests translated to the engine contract.

Thin by design: it admits a request (the engine tokenizes and fits it, failing it alone), then
feeds it to the engine — straight into the engine's own loop for an engine that batches itself
(the paged engine, vLLM: newcomers join the running batch at its next step), or through Serve's
batcher for a static-batch engine — and translates the engine's deltas back to the caller.
Streaming and non-streaming requests share batches. It calls nothing but the contract in
frugalserve.experts.engine; the engine factory is injected, so a test can run it with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

from frugalserve.experts.engine import Admission, Completion, Engine, GenerationRequest, StreamDelta
from frugalserve.experts.spec import EngineSpec, default_cost_per_1k
from frugalserve.serve_app.config import ExpertConfig
from frugalserve.serve_app.metrics import expert_metrics
from ray import serve

logger = logging.getLogger("ray.serve")

EngineFactory = Callable[[EngineSpec, float, str], Engine]  # (spec, GPU share, expert name)


def _default_factory(spec: EngineSpec, gpu_share: float, name: str) -> Engine:
    from frugalserve.experts.loader import build_engine  # torch: loaded in the replica only

    return build_engine(spec, gpu_share, name)


class ExpertServer:
    """Serve deployment class for one expert; `build_app` wraps it with `serve.deployment`."""

    def __init__(self, spec: dict, engine_factory: EngineFactory | None = None):
        self.spec = ExpertConfig.model_validate(spec)
        engine_spec, deployment = self.spec.local, self.spec.deployment
        _limit_threads(deployment.resources.num_cpus)
        gpus = deployment.resources.num_gpus
        self.engine: Engine = (engine_factory or _default_factory)(
            engine_spec, gpus if gpus > 0 else 1.0, self.spec.name)
        # static engines: Serve's batcher collects up to the engine's batch size
        self._batched.set_max_batch_size(engine_spec.scheduler.max_batch_size)
        self._batched.set_batch_wait_timeout_s(deployment.batch_wait_timeout_s)
        self.engine_info = self.engine.info()
        params = self.engine_info.num_parameters
        self.cost_in = self.spec.cost_per_1k_prompt
        self.cost_out = self.spec.cost_per_1k_completion
        if self.cost_in is None:
            self.cost_in = default_cost_per_1k(params)
        if self.cost_out is None:
            self.cost_out = default_cost_per_1k(params)
        self.memory = self.engine.memory_profile()
        if self.memory is not None:
            logger.info("expert %s memory: %s", self.spec.name, self.memory.as_dict())
        self._in_flight = 0
        self._metrics = expert_metrics()
        self._tags = {"expert": self.spec.name}
        self._weight_bytes = self.engine.weight_bytes()
        logger.info("expert %s ready (pid %d): %s batching, attention %s", self.spec.name,
                    os.getpid(), self.engine_info.batching, self.engine_info.attention)

    def info(self) -> dict:
        e = self.engine_info
        return {
            "name": self.spec.name,
            "model": self.spec.local.model,
            "engine": self.spec.local.backend,
            "batching": e.batching,
            "device": e.device,
            "dtype": e.dtype,
            "max_context": e.max_context,
            "max_tokens_default": e.default_max_tokens,
            "num_parameters": e.num_parameters,
            "cost_per_1k_prompt": self.cost_in,
            "cost_per_1k_completion": self.cost_out,
            "attention": dict(e.attention),
            "description": self.spec.description,
            "memory": self.memory.as_dict() if self.memory is not None else None,
            "quantization": e.quantization,
            "adapters": list(e.adapters),
            "weight_bytes": self._weight_bytes,
            "engine_details": dict(e.details),
        }

    def stats(self) -> dict:
        """The engine's counters (batch sizes, steps, cache use) and the replica's load."""
        return {
            **self.engine.stats(),
            "in_flight": self._in_flight,
            "memory_profile": self.memory.as_dict() if self.memory is not None else None,
            "load": self.engine.load_stats(),
            "pid": os.getpid(),
        }

    async def generate(self, request: GenerationRequest) -> Completion:
        async with contextlib.aclosing(self._deltas(request, final_only=True)) as stream:
            async for delta in stream:
                if delta.completion is not None:
                    return delta.completion  # leave now, not after the batch's next step
        raise RuntimeError("the engine ended the request without a completion")

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        async with contextlib.aclosing(self._deltas(request, final_only=False)) as stream:
            async for delta in stream:
                yield delta

    async def _deltas(self, request: GenerationRequest, final_only: bool,
                      ) -> AsyncIterator[StreamDelta]:
        admission = self.engine.admit(request)  # fails this request alone, before any batch
        self._enter()
        done = False
        try:
            async for delta in self._source(admission, final_only):
                done = delta.completion is not None
                yield delta
                if done:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            if not done:  # the caller went away: free its place in the batch and its cache
                self.engine.cancel(request.request_id)
            raise
        finally:
            self._leave()
            self.engine.release(admission)

    def _source(self, admission: Admission, final_only: bool) -> AsyncIterator[StreamDelta]:
        """Where a request's deltas come from: the engine's own loop, or Serve's batcher."""
        if self.engine.batches_itself:
            return self.engine.stream(admission, final_only=final_only)
        return self._batched(admission)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica; frugalserve.cluster.autoscaling reads it. The
        same numbers go to Prometheus."""
        return self._publish_gauges()

    def _publish_gauges(self) -> dict[str, float]:
        """Set the memory gauges (on every autoscaling report and health check, so a scrape
        always finds them) and return the autoscaling stats."""
        stats = self.engine.load_stats()
        for size in self.engine.drain_step_sizes():  # continuous engines: one per engine step
            self._metrics["batch_size"].observe(size, self._tags)
        for name, value in stats.items():
            if name in self._metrics:
                self._metrics[name].set(value, self._tags)
        self._metrics["frugalserve_weight_bytes"].set(self._weight_bytes, self._tags)
        self._metrics["queue_depth"].set(self._in_flight, self._tags)
        return stats

    def _enter(self) -> None:
        self._in_flight += 1
        self._metrics["queue_depth"].set(self._in_flight, self._tags)

    def _leave(self) -> None:
        self._in_flight -= 1
        self._metrics["queue_depth"].set(self._in_flight, self._tags)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # sizes set per spec in __init__
    async def _batched(self, admissions: list[Admission]):
        async for step in self._batch_steps(admissions):
            yield step

    async def _batch_steps(self, admissions: list[Admission]):
        """One static batch through the engine; Serve's batcher streams slot i to caller i."""
        self._metrics["batch_size"].observe(len(admissions), self._tags)
        async for step in self.engine.stream_batch(admissions):
            yield [StopIteration if d is None else d for d in step]

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not loaded")
        self._publish_gauges()


def _limit_threads(num_cpus: float) -> None:
    import torch  # the replica's torch; the router never imports it

    torch.set_num_threads(max(1, int(num_cpus)))
