"""`EngineSpec`: what one expert replica's engine runs — the model, how it is loaded, the
paged engine's scheduler and KV cache (vLLM's ModelConfig + SchedulerConfig + CacheConfig).

How Serve runs the replicas (resources, replicas, autoscaling, queue limits, Serve's batcher,
health checks) is `frugalserve.serve_app.specs.DeploymentSpec`; a remote endpoint is
`frugalserve.serve_app.specs.RemoteSpec` — Ray Serve LLM splits its `LLMConfig` the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from frugalserve.experts.engine_config import (
    DEFAULT_ADMISSION_DELAY_S,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCHED_TOKENS,
    DEFAULT_PAGE_SIZE,
    DEFAULT_STREAM_INTERVAL_S,
    kv_cache_dtype_name,
)
from frugalserve.experts.engine_config import (
    DEFAULT_MAX_TOKENS as DEFAULT_MAX_TOKENS,  # re-exported: the values live in engine_config
)
from frugalserve.experts.engine_config import (
    DEFAULT_MEMORY_FRACTION as DEFAULT_MEMORY_FRACTION,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODELS_DIR = Path(__file__).resolve().parent / "zoo" / "models"  # the zoo's package data
BUILTIN_PREFIX = "builtin:"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # expert and adapter names (clients' `model`)


HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")  # org/name[@revision]


def resolve_model_path(path: str) -> Path:
    """`builtin:NAME` is a model shipped in the package; an existing path is itself; `org/name`
    or `org/name@revision` is a Hugging Face hub id, resolved through `huggingface_hub`'s cache
    (downloaded when not cached, unless offline: `HF_HUB_OFFLINE=1`); anything else is a path."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        resolved = MODELS_DIR / name
        if not resolved.is_dir():
            shipped = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
            raise ValueError(f"unknown builtin model {name!r}; shipped models: {shipped}")
        return resolved
    try:
        local = Path(path).expanduser()
    except RuntimeError as exc:  # "~user" for a user this machine does not have
        raise ValueError(f"cannot resolve the path {path!r}: {exc}") from None
    hub = HUB_ID.match(path)
    if local.exists() or hub is None or path.startswith((".", "/", "~")):
        return local
    return resolve_hub_id(hub.group(1), hub.group(2))


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a hub model (huggingface_hub's cache, `HF_HUB_CACHE`)."""
    from huggingface_hub import constants, snapshot_download  # only hub ids need it

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - no network either: the cache may still hold it
        if not offline:
            try:
                return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            except Exception:  # noqa: BLE001 - report the first, more telling error
                pass
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise ValueError(f"model {where!r} is neither a local folder nor in the Hugging Face "
                         f"cache ({constants.HF_HUB_CACHE}"
                         f"{', offline' if offline else ''}): {exc}") from None


def spec_default(model: type[BaseModel], name: str) -> Any:
    """A config field's default, for code that takes the same knob outside the config (engine
    constructors, PagedConfig): one default per knob."""
    return model.model_fields[name].default


def default_cost_per_1k(num_params: int) -> float:
    """Cost units per 1k tokens when no price is configured: one unit per million active
    parameters, the FLOPs a token costs up to a constant (2 · params)."""
    return num_params / 1e6


class SchedulerSpec(BaseModel):
    """Batching in the engine: the paged engine's scheduler (vLLM's SchedulerConfig). A static
    engine takes `max_batch_size` requests per call from Serve's batcher."""

    model_config = ConfigDict(extra="forbid")

    continuous: Literal["auto", "on", "off"] = Field(
        "auto", description="continuous batching in the paged engine: auto = where the model "
        "family has a paged implementation (Llama-style, Falcon) and no LoRA adapters are "
        "served; on = required (else an error); off = static batches through Serve's batcher"
    )
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024, description="continuous: sequences running at once; static: requests "
        "per engine call"
    )
    max_batched_tokens: int = Field(
        DEFAULT_MAX_BATCHED_TOKENS, ge=16, le=1_048_576, description="continuous: tokens one engine step computes "
        "(prefill chunks + decodes); longer prompts are prefilled in chunks"
    )
    admission_delay_s: float = Field(
        DEFAULT_ADMISSION_DELAY_S, ge=0, le=1, description="continuous: while others decode, a newcomer waits up to "
        "this long so several prefills share one step"
    )
    stream_interval_s: float = Field(
        DEFAULT_STREAM_INTERVAL_S, ge=0, le=1, description="continuous: a streamed request gets its first token at "
        "once, then its new tokens in chunks at most this often"
    )


class KVCacheSpec(BaseModel):
    """The replica's memory for weights and KV cache (vLLM's CacheConfig)."""

    model_config = ConfigDict(extra="forbid")

    page_size: int = Field(DEFAULT_PAGE_SIZE, ge=1, le=1024, description="tokens per KV-cache page")
    cuda_graphs: bool = Field(DEFAULT_CUDA_GRAPHS, description="replay decode steps from CUDA graphs (GPU only)")
    memory_fraction: float = Field(
        DEFAULT_MEMORY_FRACTION, gt=0, le=1,
        description="share of device memory (or the budget) weights + tokens may use"
    )
    memory_budget_bytes: int | None = Field(
        None, gt=0, description="memory per replica instead of the device's (CPU: the RAM)"
    )
    dtype: str = Field(
        "auto", description="what the KV cache stores: auto = the model's dtype (bfloat16, float16, "
        "float32 name it explicitly and must match it); fp8 = float8 e4m3 with per-layer, per-KV-head "
        "scales calibrated at load: half the bytes per token of bf16 (paged engine; vLLM: its "
        "kv_cache_dtype fp8)"
    )

    @field_validator("dtype")
    @classmethod
    def _kv_dtype(cls, value: str) -> str:
        return kv_cache_dtype_name(value)


class VLLMOptions(BaseModel):
    """`engine.vllm`: engine arguments passed through to vLLM's `AsyncEngineArgs`.
    Unset options keep vLLM's defaults."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int | None = Field(None, ge=1, description="GPUs one replica shards the model over")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of each GPU's memory vLLM may take (weights + KV cache)")
    max_model_len: int | None = Field(None, ge=8, description="context length; default: "
                                      "engine.max_context, else the model's")
    quantization: str | None = Field(None, description="vLLM quantization method: awq, gptq, fp8, "
                                     "bitsandbytes, ...")
    enable_lora: bool | None = Field(None, description="serve LoRA adapters")
    max_loras: int | None = Field(None, ge=1, description="LoRA adapters in one batch")
    max_lora_rank: int | None = Field(None, ge=1, description="largest LoRA rank served")
    attention_backend: str | None = Field(
        None, description="vLLM attention backend name; CUSTOM: frugalserve's kernels (the plugin)")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV-cache bytes per GPU, instead of sizing it from "
        "gpu_memory_utilization (for replicas that share a GPU)")
    kv_cache_dtype: str | None = Field(None, description="auto, bfloat16, fp8, ...")
    block_size: int | None = Field(None, ge=1, description="KV-cache block size in tokens")
    max_num_seqs: int | None = Field(None, ge=1, description="requests vLLM runs at once")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens per scheduler step")
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = Field(None, description="no CUDA graphs")
    seed: int | None = Field(None, description="engine seed (per-request seeds come from requests)")
    trust_remote_code: bool | None = None


def validate_vllm_options(options: dict | None, expert: str = "") -> VLLMOptions:
    """Check `engine.vllm`; errors name the expert and the bad key (needs neither vllm nor torch)."""
    where = f"expert {expert!r}: " if expert else ""
    options = dict(options or {})
    unknown = sorted(set(options) - set(VLLMOptions.model_fields))
    if unknown:
        raise ValueError(f"{where}unknown vllm option(s) {unknown}; known: {sorted(VLLMOptions.model_fields)}")
    try:
        return VLLMOptions.model_validate(options)
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}bad vllm option(s): {bad}") from None


class EngineSpec(BaseModel):
    """One local expert's engine: the model, how it is loaded and batched, its memory."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., description="local Hugging Face model folder, builtin:NAME, or a "
                       "hub id org/name[@revision] (huggingface_hub's cache)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: the paged or static engine; vllm: vLLM (extra)"
    )
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
        description="backend vllm: AsyncEngineArgs passed through (tensor_parallel_size, "
        "gpu_memory_utilization, max_model_len, quantization, enable_lora, attention_backend: CUSTOM "
        "for frugalserve's kernels, ...); keys: frugalserve.experts.spec.VLLMOptions",
    )
    max_context: int | None = Field(
        None, ge=8, description="prompt + completion tokens; default: the model's own limit"
    )
    max_tokens_default: int = Field(DEFAULT_MAX_TOKENS, ge=1,
                                    description="max_tokens when a request omits it")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    kv_cache: KVCacheSpec = Field(default_factory=KVCacheSpec)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX):
            resolve_model_path(value)
        return value

    @field_validator("vllm")
    @classmethod
    def _vllm_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        validate_vllm_options(value)
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '.', '_', '-'")
            folder = resolve_model_path(path)
            if not (folder / "adapter_config.json").is_file():
                raise ValueError(f"adapter {name!r}: no peft adapter at {str(folder)!r}")
        return value

    @model_validator(mode="after")
    def _backend_available(self) -> EngineSpec:
        if self.backend == "vllm":
            import importlib.util  # a stdlib probe: vllm itself is never imported here

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(
                    "engine.backend 'vllm' is not installed: install the extra with "
                    "`pip install 'frugalserve[vllm]'` (needs a CUDA GPU)"
                )
        return self

    @property
    def model_path(self) -> Path:
        return resolve_model_path(self.model)
