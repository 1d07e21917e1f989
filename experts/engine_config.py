"""The engine's knobs as plain values: the defaults of `EngineSpec`'s fields and the names `kv_cache.dtype`
takes. Stdlib only: the config (pydantic, experts/spec.py) and the engines read the same values, and the
engines' import chain needs no pydantic (the GPU image has none)."""

from __future__ import annotations

DEFAULT_MAX_TOKENS = 64  # a chat request's max_tokens when it sets none
DEFAULT_MEMORY_FRACTION = 0.9  # share of a replica's memory weights + KV cache may take
DEFAULT_MAX_BATCH_SIZE = 64  # scheduler.max_batch_size
DEFAULT_MAX_BATCHED_TOKENS = 2048  # scheduler.max_batched_tokens
DEFAULT_ADMISSION_DELAY_S = 0.0  # scheduler.admission_delay_s
DEFAULT_STREAM_INTERVAL_S = 0.05  # scheduler.stream_interval_s
DEFAULT_PAGE_SIZE = 16  # kv_cache.page_size
DEFAULT_CUDA_GRAPHS = True  # kv_cache.cuda_graphs

# what a config may say -> the canonical name the engines read
KV_CACHE_DTYPES = {
    "auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
    "half": "float16", "float32": "float32", "fp32": "float32", "fp8": "fp8", "fp8_e4m3": "fp8",
}


def kv_cache_dtype_name(value: str) -> str:
    """The canonical kv_cache.dtype for `value` (aliases such as bf16 or fp8_e4m3 accepted); a
    ValueError naming the value and the choices otherwise."""
    canonical = KV_CACHE_DTYPES.get(str(value).strip().lower())
    if canonical is None:
        raise ValueError(f"kv_cache.dtype {value!r} is not supported; one of: auto (the model's dtype), "
                         "bfloat16 (bf16), float16 (fp16), float32 (fp32), fp8 (fp8_e4m3: e4m3 with "
                         "per-head scales calibrated at load)")
    return canonical
