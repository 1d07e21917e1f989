"""The expert deployment: one engine per replica, concurrent requests batched into one call.

Thin by design: it validates a request against the engine's context, hands it to the batcher,
and translates the engine's deltas back to the caller. Streaming and non-streaming requests share
batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from frugalserve.experts.engine import Completion, GenerationRequest, StreamDelta
from frugalserve.experts.memory import TokenLedger, profile_model
from frugalserve.experts.spec import ExpertSpec, default_cost_per_1k
from ray import serve

logger = logging.getLogger("ray.serve")


def _load_engine(spec: ExpertSpec):
    if spec.engine == "vllm":  # the spec validator already checked vllm is installed
        from frugalserve.experts.vllm_engine import VLLMEngine

        return VLLMEngine.from_spec(spec)
    from frugalserve.experts.transformers_engine import TransformersEngine

    return TransformersEngine.from_spec(spec)


class ExpertServer:
    """Serve deployment class for one expert; `build_app` wraps it with `serve.deployment`."""

    def __init__(self, spec: dict):
        self.spec = ExpertSpec.model_validate(spec)
        import torch

        torch.set_num_threads(max(1, int(self.spec.resources.num_cpus)))
        self.engine = _load_engine(self.spec)
        self._batched.set_max_batch_size(self.spec.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)
        params = getattr(self.engine, "num_parameters", 0)
        self.cost_in = self.spec.cost_per_1k_prompt
        self.cost_out = self.spec.cost_per_1k_completion
        if self.cost_in is None:
            self.cost_in = default_cost_per_1k(params)
        if self.cost_out is None:
            self.cost_out = default_cost_per_1k(params)
        self.num_parameters = params
        self.memory, self.ledger = self._profile_memory()
        self._in_flight = 0
        from frugalserve.serve_app.metrics import expert_metrics

        self._metrics = expert_metrics()
        self._tags = {"expert": self.spec.name}
        self._weight_bytes = float(self.engine.memory_stats().get("weight_bytes", 0.0))
        logger.info("expert %s ready (pid %d)", self.spec.name, os.getpid())

    def info(self) -> dict:
        return {
            "name": self.spec.name,
            "model": self.spec.model,
            "engine": self.spec.engine,
            "max_context": self.engine.max_context,
            "max_tokens_default": self.spec.max_tokens_default,
            "num_parameters": self.num_parameters,
            "cost_per_1k_prompt": self.cost_in,
            "cost_per_1k_completion": self.cost_out,
            "attention_backend": getattr(self.engine, "attention_backend", "unknown"),
            "description": self.spec.description,
            "memory": self.memory.as_dict() if self.memory is not None else None,
            "quantization": getattr(self.engine, "quantization", "none"),
            "adapters": list(getattr(self.engine, "adapters", [])),
            "weight_bytes": self.engine.memory_stats().get("weight_bytes"),
        }

    def stats(self) -> dict:
        """Engine call sizes so far (how well batching works) and memory facts."""
        return {
            "batch_sizes": list(getattr(self.engine, "batch_sizes", [])),
            "cancelled": getattr(self.engine, "cancelled_total", 0),
            "in_flight": self._in_flight,
            "memory_profile": self.memory.as_dict() if self.memory is not None else None,
            "tokens": self.ledger.snapshot() if self.ledger is not None else None,
            "memory": self.engine.memory_stats(),
            "pid": os.getpid(),
        }

    def count_tokens(self, request: GenerationRequest) -> int:
        return self.engine.count_prompt_tokens(request)

    async def generate(self, request: GenerationRequest) -> Completion:
        self._admit(request)  # fail this request alone, before it joins a batch
        self._enter()
        try:
            async for delta in self._source(request):
                if delta.completion is not None:
                    return delta.completion  # leave now, not after the batch's next step
        except (asyncio.CancelledError, GeneratorExit):
            self.engine.cancel(request.request_id)
            raise
        finally:
            self._leave()
            self._unqueue(request)
        raise RuntimeError("the engine ended the request without a completion")

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        self._admit(request)
        self._enter()
        try:
            async for delta in self._source(request):
                yield delta
                if delta.completion is not None:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away mid-stream: free its place in the batch.
            self.engine.cancel(request.request_id)
            raise
        finally:
            self._leave()
            self._unqueue(request)

    def _source(self, request: GenerationRequest):
        """Where a request's deltas come from: our batcher, or, for an engine that batches
        itself (vLLM's continuous batching), the engine directly, so Serve's one-batch-at-a-time
        batcher does not hold new requests back."""
        if getattr(self.engine, "batches_itself", False):
            return self.engine.stream(request)
        return self._batched(request)

    def _profile_memory(self):
        """Measure memory per token once, before serving (the autoscaler reads it)."""
        model = getattr(self.engine, "model", None)
        if model is None:  # an engine without a torch model (vLLM): no memory metrics, Serve holds
            return None, None
        a = self.spec.autoscaling
        profile = profile_model(model, memory_fraction=a.memory_fraction,
                                memory_budget_bytes=a.memory_budget_bytes, name=self.spec.name)
        logger.info("expert %s memory: %s", self.spec.name, profile.as_dict())
        return profile, TokenLedger.for_profile(profile)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica; frugalserve.cluster.autoscaling reads it. The
        same numbers go to Prometheus."""
        return self._publish_gauges()

    def _publish_gauges(self) -> dict[str, float]:
        """Set the memory gauges (on every autoscaling report and health check, so a scrape
        always finds them) and return the autoscaling stats."""
        stats = self.ledger.autoscaling_stats() if self.ledger is not None else {}
        for name, value in stats.items():
            if name in self._metrics:
                self._metrics[name].set(value, self._tags)
        self._metrics["frugalserve_weight_bytes"].set(self._weight_bytes, self._tags)
        self._metrics["queue_depth"].set(self._in_flight, self._tags)
        return stats

    def _admit(self, request: GenerationRequest) -> None:
        """Check the request fits (failing it alone, before it joins a batch) and count its
        prompt in the token ledger, queued until its batch starts."""
        prompt_tokens = self.engine.count_prompt_tokens(request)
        self.engine.check_fits(request, prompt_tokens)
        if self.ledger is not None:
            self.ledger.add(id(request), prompt_tokens)

    def _unqueue(self, request: GenerationRequest) -> None:
        if self.ledger is not None:  # a running batch keeps its rows until it ends (_batched)
            self.ledger.release_if_queued(id(request))

    def _enter(self) -> None:
        self._in_flight += 1
        self._metrics["queue_depth"].set(self._in_flight, self._tags)

    def _leave(self) -> None:
        self._in_flight -= 1
        self._metrics["queue_depth"].set(self._in_flight, self._tags)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[GenerationRequest]):
        self._metrics["batch_size"].observe(len(requests), self._tags)
        keys, ledger = [id(r) for r in requests], self.ledger
        if ledger is not None:
            ledger.start(keys)
        try:
            async for step in self.engine.stream_batch(requests):
                if ledger is not None:
                    for key, d in zip(keys, step):
                        if d is not None:  # one decoding step: one more token per live row
                            ledger.advance(key)
                yield [StopIteration if d is None else d for d in step]
        finally:
            if ledger is not None:  # the batch's cache is freed now, finished rows included
                for key in keys:
                    ledger.release(key)

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not loaded")
        self._publish_gauges()
