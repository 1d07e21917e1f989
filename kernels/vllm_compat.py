"""The vLLM releases frugalserve's attention backend and engine are written against, and everything
that differs between them. The rest of the code asks this module; no other file compares versions.

| minor | torch it pins | per-layer KV cache (logical shape) | who sets the shape |
|---|---|---|---|
| 0.24 | 2.11 | `[num_blocks, 2, block_size, Hkv, D]` (K, V on dim 1) | the backend's `get_kv_cache_shape` |
| 0.33 | 2.14 | `[num_blocks, Hkv, block_size, 2*D]` (K then V in the last dim) | vLLM (`KVCacheLayout`) |

The attention ABCs (`vllm.v1.attention.backend`), the registry's `register_backend` and CUSTOM slot,
`CommonAttentionMetadata`'s fields, `AttentionImpl`'s constructor and `forward`,
`do_kv_cache_update` (with `forward_includes_kv_cache_update = False`) and vLLM's
`triton_reshape_and_cache_flash` writer are the same in both. So are the engine's entry points
(`AsyncLLM.from_engine_args(..., stat_loggers=)`, `generate(..., lora_request=)`,
`SamplingParams`, `StructuredOutputsParams`, `RequestOutputKind.DELTA`). Other minors are refused:
the KV layout moved between them at least once, and nothing here has been checked against them.

Needs neither vLLM nor a GPU to import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Release:
    minor: str  # "0.24"
    torch: str  # the torch minor this vLLM pins
    kv_layout: str  # "split" ([blocks, 2, block, Hkv, D]) or "packed" ([blocks, Hkv, block, 2D])

    @property
    def backend_sets_kv_shape(self) -> bool:
        """Before vLLM's `KVCacheLayout`, each backend declared its cache shape."""
        return self.kv_layout == "split"


RELEASES = {
    "0.24": Release("0.24", torch="2.11", kv_layout="split"),
    "0.33": Release("0.33", torch="2.14", kv_layout="packed"),
}
SUPPORTED_TEXT = " or ".join(f"{m}.x" for m in RELEASES)


class VLLMUnavailableError(ImportError):
    """vLLM is not installed, or not a release this backend supports."""


def release_for(version: str) -> Release:
    """The supported release a `vllm.__version__` belongs to; raises naming the supported ones."""
    minor = ".".join(str(version).split(".")[:2])
    if minor not in RELEASES:
        raise VLLMUnavailableError(
            f"frugalserve's vLLM integration supports vLLM {SUPPORTED_TEXT}, found {version}; the "
            "attention-backend interfaces change between minors"
        )
    return RELEASES[minor]


def import_vllm():
    """`import vllm`, checked against the supported releases; returns (module, Release)."""
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailableError(
            f"frugalserve's vLLM integration needs vLLM {SUPPORTED_TEXT}: install it with "
            f"`pip install 'frugalserve[vllm]'` ({exc})"
        ) from exc
    return vllm, release_for(getattr(vllm, "__version__", "unknown"))


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    """The logical per-layer cache shape a `split`-layout backend declares (vLLM 0.24)."""
    if block_size % 16:
        raise ValueError(f"block size {block_size} must be a multiple of 16")
    return (num_blocks, 2, block_size, num_kv_heads, head_size)


FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")  # e4m3 on CUDA (vLLM's current_platform.fp8_dtype())


def split_kv_cache(kv_cache: torch.Tensor, head_size: int, kv_cache_dtype: str = "auto",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views `[num_blocks, block_size, Hkv, head_size]` (the layout our kernels read, at any
    strides) of one layer's vLLM cache, in either release's logical shape:

    - 0.24: `[num_blocks, 2, block_size, Hkv, head_size]`
    - 0.33: `[num_blocks, Hkv, block_size, 2 * head_size]`, physical strides set by the layout
      vLLM resolved (LBNHC, LBHNC, ...).

    An fp8 `kv_cache_dtype`'s cache (vLLM allocates it as uint8) is viewed as float8_e4m3fn."""
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES and kv_cache.dtype != torch.float8_e4m3fn:
        if kv_cache.element_size() != 1:
            raise ValueError(f"an fp8 KV cache must hold bytes, got {kv_cache.dtype}")
        kv_cache = kv_cache.view(torch.float8_e4m3fn)
    if kv_cache.dim() == 5 and kv_cache.shape[1] == 2 and kv_cache.shape[-1] == head_size:
        key_cache, value_cache = kv_cache.unbind(1)
        return key_cache, value_cache
    if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_size:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return key_cache, value_cache
    raise ValueError(
        f"kv_cache must be [num_blocks, 2, block_size, Hkv, {head_size}] (vLLM 0.24) or "
        f"[num_blocks, Hkv, block_size, 2*{head_size}] (vLLM 0.33), got {tuple(kv_cache.shape)}"
    )
