"""`ExpertSpec`: everything the application needs to know to run one expert."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODELS_DIR = Path(__file__).resolve().parent / "zoo" / "models"  # the zoo's package data
BUILTIN_PREFIX = "builtin:"


def resolve_model_path(path: str) -> Path:
    """`builtin:NAME` is a model shipped in the package; anything else is a filesystem path."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        resolved = MODELS_DIR / name
        if not resolved.is_dir():
            shipped = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
            raise ValueError(f"unknown builtin model {name!r}; shipped models: {shipped}")
        return resolved
    return Path(path).expanduser()


def default_cost_per_1k(num_params: int) -> float:
    """Cost units per 1k tokens when no price is configured: one unit per million active
    parameters, the FLOPs a token costs up to a constant (2 · params)."""
    return num_params / 1e6


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    continuous: Literal["auto", "on", "off"] = Field(
        "auto", description="continuous batching in the paged engine: auto = where the model "
        "family has a paged implementation (Llama-style, Falcon) and no LoRA adapters are "
        "served; on = required (else an error); off = static batches through Serve's batcher"
    )
    max_batch_size: int = Field(
        64, ge=1, le=1024, description="continuous: sequences running at once; static: requests "
        "per engine call"
    )
    max_batched_tokens: int = Field(
        2048, ge=16, le=1_048_576, description="continuous: tokens one engine step computes "
        "(prefill chunks + decodes); longer prompts are prefilled in chunks"
    )
    admission_delay_s: float = Field(
        0.0, ge=0, le=1, description="continuous: while others decode, a newcomer waits up to "
        "this long so several prefills share one step"
    )
    stream_interval_s: float = Field(
        0.05, ge=0, le=1, description="continuous: a streamed request gets its first token at "
        "once, then its new tokens in chunks at most this often"
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="static: how long the first request of a batch waits for "
        "company"
    )


class KVCacheConfig(BaseModel):
    """The paged engine's KV cache (continuous batching)."""

    model_config = ConfigDict(extra="forbid")

    page_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache page")
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs (GPU only)")


class ReplicaResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per replica")
    num_gpus: float = Field(
        1.0, ge=0, description="GPUs per replica; used only where the cluster has GPUs"
    )
    memory_bytes: int | None = Field(None, ge=0, description="Ray memory reservation per replica")


class AutoscalingSpec(BaseModel):
    """How Serve scales an expert: by memory per token in flight (frugalserve.cluster.autoscaling)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="scale by memory per token; off: `num_replicas` fixed")
    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy; default min")
    target_utilisation: float = Field(
        0.7, gt=0, le=1, description="share of a replica's usable memory its tokens should take"
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of device memory (or the budget) weights + tokens may use"
    )
    memory_budget_bytes: int | None = Field(
        None, gt=0, description="memory per replica instead of the device's (CPU: the RAM)"
    )
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="request floor: replicas >= ongoing / this; default 2 x max_batch_size"
    )
    upscale_delay_s: float = Field(0.0, ge=0, description="demand above this long before adding")
    downscale_delay_s: float = Field(60.0, ge=0, description="demand below this long before removing")
    look_back_period_s: float = Field(10.0, gt=0, description="window the replicas' reports average over")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas report")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= "
                             f"max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"autoscaling.initial_replicas ({self.initial_replicas}) must be "
                             f"within [{self.min_replicas}, {self.max_replicas}]")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"autoscaling.look_back_period_s ({self.look_back_period_s}) must be "
                             f"> metrics_interval_s ({self.metrics_interval_s})")
        return self


class ExpertSpec(BaseModel):
    """One expert (or cascade tier): a model, the engine that runs it, and what it costs."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="id clients use as `model`")
    kind: Literal["local", "openai"] = Field(
        "local", description="local: a deployment runs the model; openai: a remote endpoint"
    )
    model: str | None = Field(None, description="local Hugging Face model folder, or builtin:NAME")
    base_url: str | None = Field(None, description="kind openai: the endpoint's /v1 URL")
    api_key_env: str | None = Field(
        None, description="kind openai: environment variable that holds the API key"
    )
    remote_model: str | None = Field(None, description="kind openai: `model` sent upstream")
    connect_timeout_s: float = Field(5.0, gt=0, description="kind openai: connect timeout")
    engine: Literal["transformers", "vllm"] = "transformers"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="bitsandbytes weights: 8-bit LLM.int8 or 4-bit NF4 (CPU and GPU)"
    )
    double_quant: bool = Field(True, description="nf4: quantize the quantization constants too")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters on this base, served by this deployment: expert name -> "
        "peft adapter folder (or builtin:NAME); each name is a `model` clients can send",
    )
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="engine vllm: AsyncEngineArgs passed through (tensor_parallel_size, "
        "gpu_memory_utilization, max_model_len, quantization, enable_lora, attention_backend: CUSTOM "
        "for frugalserve's kernels, ...); keys: frugalserve.experts.vllm_engine.VLLMOptions",
    )
    max_context: int | None = Field(
        None, ge=8, description="prompt + completion tokens; default: the model's own limit"
    )
    max_tokens_default: int = Field(64, ge=1, description="max_tokens when a request omits it")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    num_replicas: int = Field(1, ge=1, description="replicas when autoscaling is off")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests a replica holds at once (Serve's backpressure)"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before new ones get a 503 "
        "`overloaded`; -1: no bound"
    )
    cost_per_1k_prompt: float | None = Field(
        None, ge=0, description="cost units per 1k prompt tokens; default: from parameter count"
    )
    cost_per_1k_completion: float | None = Field(
        None, ge=0, description="cost units per 1k completion tokens; default: from parameter count"
    )
    description: str = ""

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(BUILTIN_PREFIX):
            resolve_model_path(value)
        return value

    @field_validator("vllm")
    @classmethod
    def _vllm_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        from frugalserve.experts.vllm_engine import validate_vllm_options

        validate_vllm_options(value)
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name, path in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '.', '_', '-'")
            folder = resolve_model_path(path)
            if not (folder / "adapter_config.json").is_file():
                raise ValueError(f"adapter {name!r}: no peft adapter at {str(folder)!r}")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> ExpertSpec:
        if self.kind == "local" and not self.model:
            raise ValueError(f"expert {self.name!r}: `model` is required for a local expert")
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError(f"expert {self.name!r}: kind 'openai' needs `base_url`")
            if self.cost_per_1k_prompt is None or self.cost_per_1k_completion is None:
                raise ValueError(
                    f"expert {self.name!r}: kind 'openai' needs cost_per_1k_prompt and "
                    "cost_per_1k_completion (its size is unknown)"
                )
        return self

    @model_validator(mode="after")
    def _engine_available(self) -> ExpertSpec:
        if self.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(
                    f"expert {self.name!r} asks for engine 'vllm', which is not installed: "
                    "install the extra with `pip install 'frugalserve[vllm]'` (needs a CUDA GPU)"
                )
        return self

    @property
    def model_path(self) -> Path:
        if self.model is None:
            raise ValueError(f"expert {self.name!r} has no local model")
        return resolve_model_path(self.model)
