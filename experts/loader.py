"""The engine an expert spec asks for: vLLM, the continuous-batching paged engine, or the plain
static-batch transformers engine — decided here, once, and logged with the reason."""

from __future__ import annotations

import logging

from frugalserve.experts.engine import Engine
from frugalserve.experts.spec import EngineSpec, resolve_model_path

logger = logging.getLogger(__name__)


def build_engine(spec: EngineSpec, gpu_share: float = 1.0, name: str = "") -> Engine:
    """Load `spec`'s model into the engine that serves it, as expert `name`. `gpu_share`: the
    fraction of its GPU the replica was given (Ray's `num_gpus`), which sizes the paged
    engine's KV cache."""
    name = name or spec.model_path.name
    if spec.backend == "vllm":
        from frugalserve.experts.vllm_engine import VLLMEngine  # vllm: an optional extra

        return VLLMEngine.from_spec(spec, name)
    from frugalserve.experts.paged.engine import PagedConfig, PagedEngine
    from frugalserve.experts.paged.models import UnsupportedModel, paged_model_for
    from frugalserve.experts.transformers_engine import (
        TransformersEngine,
        load_model,
        model_context_limit,
    )

    adapters = {n: resolve_model_path(p) for n, p in spec.adapters.items()}
    model, tokenizer = load_model(spec.model_path, device=spec.device, dtype=spec.dtype,
                                  quantization=spec.quantization, double_quant=spec.double_quant,
                                  adapters=adapters)
    common = dict(max_context=spec.max_context, name=name,
                  default_max_tokens=spec.max_tokens_default, quantization=spec.quantization)
    mode, reason = spec.scheduler.continuous, "engine.scheduler.continuous: off"
    if mode != "off":
        try:
            limit = min(spec.max_context or model_context_limit(model.config),
                        model_context_limit(model.config))
            paged = paged_model_for(model, limit)
        except UnsupportedModel as exc:
            if mode == "on":
                raise ValueError(f"expert {name!r}: engine.scheduler.continuous is 'on' but "
                                 f"{exc}") from exc
            reason = str(exc)
        else:
            config = PagedConfig.from_spec(spec, gpu_share)
            engine = PagedEngine(model, tokenizer, config=config, paged=paged, **common)
            logger.info("expert %s: continuous batching (paged engine, %s)", name,
                        engine.info().attention)
            return engine
    if spec.kv_cache.dtype == "fp8":
        raise ValueError(f"expert {name!r}: kv_cache.dtype fp8 needs the paged engine, which does not "
                         f"run this expert ({reason})")
    logger.info("expert %s: static batching (%s)", name, reason)
    dev = next(model.parameters()).device
    return TransformersEngine(
        model, tokenizer, adapters=list(adapters), use_kernels=dev.type == "cuda" and not adapters,
        memory_fraction=spec.kv_cache.memory_fraction,
        memory_budget_bytes=spec.kv_cache.memory_budget_bytes, static_reason=reason, **common)
