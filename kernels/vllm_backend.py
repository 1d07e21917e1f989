"""frugalserve's attention kernels as a vLLM attention backend, for vLLM 0.24.x and 0.33.x (what
differs between them lives in `vllm_compat`).

`register()` is the `vllm.general_plugins` entry point: it runs in every vLLM process (engine core,
workers) and maps `AttentionBackendEnum.CUSTOM` to `FrugalAttentionBackend`; the model then selects
it with `attention_backend="CUSTOM"`. The impl runs our kernels through `dispatch` (Triton on CUDA,
the reference elsewhere): every row of a step (decodes, prefills, chunked prefills, prefix-cache
hits) in one launch of the paged prefill kernel, which reads vLLM's query_start_loc, seq_lens and
block table on the device. Nothing is planned on the host, so the builder declares full CUDA-graph
support (`AttentionCGSupport.ALWAYS`). ALiBi slopes and GQA/MQA are supported, and vLLM's fp8 (e4m3) KV
cache (`kv_cache_dtype` "fp8" / "fp8_e4m3": vLLM allocates it as bytes, viewed here as
float8_e4m3fn, with the per-layer float32 scales `layer._k_scale` / `layer._v_scale`, quantized as
x / scale on write and read back as cache x scale, as vLLM's own Triton backend does; queries stay
unquantized). Anything else the kernels lack (sliding window, soft-capping, sinks, fp8_e5m2 and other
quantized KV caches, fp32, other head sizes, encoder or cross attention) is refused with the reason,
at validation where vLLM asks and in the impl.

Only the ABCs come from vLLM. Subclassing vLLM's own Triton backend/impl would inherit capability
flags our kernels do not have (sinks, sliding window, non-causal, fp8 KV, fused fp8 output quant),
so every one would need an override; the plain ABCs default them all to "unsupported".

Importing this module needs no vLLM: the classes are defined on first attribute access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import HEAD_DIMS_TEXT, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from .vllm_compat import (
    SUPPORTED_TEXT,
    VLLMUnavailableError,
    import_vllm,
    kv_cache_shape,
    split_kv_cache,
)

__all__ = ["SUPPORTED_TEXT", "VLLMUnavailableError", "split_kv_cache", "register",
           "unsupported_reasons", "write_kv", "attend"]

CLASS_PATH = f"{__name__}.FrugalAttentionBackend"
_CLASSES = ("FrugalAttentionBackend", "FrugalAttentionImpl", "FrugalAttentionMetadata",
            "FrugalAttentionMetadataBuilder")
_SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3")


def register() -> str:
    """The `vllm.general_plugins` entry point. Re-entrant (vLLM calls it in every process).
    Returns the registered class path; raises `VLLMUnavailableError` naming the extra without vLLM."""
    import_vllm()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    current = AttentionBackendEnum.CUSTOM.get_path() if AttentionBackendEnum.CUSTOM.is_overridden() else None
    if current not in (None, CLASS_PATH):
        raise RuntimeError(
            f"vLLM's one CUSTOM attention slot is already taken by {current!r}; frugalserve's "
            "backend cannot register (disable the other plugin with VLLM_PLUGINS=...)"
        )
    # `class_path` by keyword: the positional order changed across vLLM releases.
    register_backend(AttentionBackendEnum.CUSTOM, class_path=CLASS_PATH)
    return CLASS_PATH


def unsupported_reasons(
    *, head_size: int, num_heads: int, num_kv_heads: int, alibi_slopes=None, sliding_window=None,
    kv_cache_dtype: str = "auto", logits_soft_cap=None, attn_type: str = "decoder", sinks=None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Why our kernels cannot run this attention layer; empty when they can."""
    reasons = []
    if head_size not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head size {head_size} (the kernels take {HEAD_DIMS_TEXT})")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        reasons.append(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if alibi_slopes is not None and len(alibi_slopes) != num_heads:
        reasons.append(f"{len(alibi_slopes)} ALiBi slopes for {num_heads} heads")
    if sliding_window is not None:
        reasons.append(f"sliding window {sliding_window}")
    if kv_cache_dtype not in _SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(f"kv_cache_dtype {kv_cache_dtype!r} (only {_SUPPORTED_KV_CACHE_DTYPES})")
    if logits_soft_cap:
        reasons.append(f"logits soft-capping ({logits_soft_cap})")
    if str(getattr(attn_type, "value", attn_type)) != "decoder":
        reasons.append(f"attention type {attn_type} (decoder self-attention only)")
    if sinks is not None:
        reasons.append("attention sinks")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} (the kernels take {SUPPORTED_DTYPES})")
    return reasons


def write_kv(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Scatter key/value [T, Hkv, D] into strided caches [num_blocks, block_size, Hkv, D] at flat
    slots `block * block_size + offset`; slots < 0 (padding) are skipped. fp8 caches store
    `clamp(x / scale, -448, 448)` in e4m3 (kv_cache.quantize_fp8; vLLM's per-layer scalar scales)."""
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
    else:
        key, value = key[:n], value[:n]
    if key_cache.dtype == torch.float8_e4m3fn:
        from .kv_cache import quantize_fp8

        # index_put_ has no fp8 kernel on CPU: write the bytes
        key = quantize_fp8(key, k_scale.float().reshape(-1)).view(torch.uint8)
        value = quantize_fp8(value, v_scale.float().reshape(-1)).view(torch.uint8)
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key
    value_cache[blocks, offsets] = value


def attend(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out, *, max_query_len,
           scale, alibi_slopes, k_scale=None, v_scale=None) -> None:
    """Attention of query [T, Hq, D] over the paged cache (new K/V already written) into out
    [T, Hq, D]: every row of the step, decodes and prefill chunks alike, in one launch of the paged
    prefill kernel (`dispatch.paged_prefill`), which reads `query_start_loc` [B + 1], `seq_lens` [B]
    and `block_table` [>= B, max_blocks] on the device. Nothing is read on the host, nothing is
    allocated by value: the launch can be captured in a CUDA graph and replayed with vLLM's
    persistent buffers. Requests with an empty query (padding) are skipped by the kernel.
    `max_query_len` (host int) picks the tile only. An fp8 cache is read with `k_scale`/`v_scale`
    (float32, [1] or [Hkv])."""
    from . import dispatch

    if key_cache.dtype == torch.float8_e4m3fn:
        k_scale, v_scale = (s.float().reshape(-1) for s in (k_scale, v_scale))
    else:
        k_scale = v_scale = None
    num_reqs = query_start_loc.shape[0] - 1
    dispatch.paged_prefill(query, key_cache, value_cache, block_table[:num_reqs], query_start_loc,
                           seq_lens[:num_reqs], max_seqlen_q=max_query_len, alibi_slopes=alibi_slopes,
                           scale=scale, out=out, k_scale=k_scale, v_scale=v_scale)


def __getattr__(name: str):
    if name in _CLASSES:
        globals().update(_define())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define() -> dict:
    """Build the vLLM classes (needs a supported vLLM). Module-level names with plain qualnames, so
    vLLM resolves and pickles them by `CLASS_PATH`."""
    _, release = import_vllm()
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadata,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
        MultipleOf,
    )

    @dataclass
    class FrugalAttentionMetadata(AttentionMetadata):
        num_actual_tokens: int
        max_query_len: int
        max_seq_len: int
        query_start_loc: torch.Tensor  # [B + 1]
        seq_lens: torch.Tensor  # [B] context incl. new tokens
        block_table: torch.Tensor  # [B, max_blocks]
        slot_mapping: torch.Tensor  # [T]
        causal: bool | torch.Tensor

    class FrugalAttentionMetadataBuilder(AttentionMetadataBuilder[FrugalAttentionMetadata]):
        # The metadata is vLLM's own device tensors, read in place by one kernel launch per layer:
        # full CUDA graphs for any batch, as vLLM's Triton backend declares.
        _cudagraph_support = AttentionCGSupport.ALWAYS

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM's ABC
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

        def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata
                                        ) -> FrugalAttentionMetadata:
            metadata = self.build(0, common_attn_metadata)
            # capture with one-token contexts: the captured launch reads the real lengths on replay
            metadata.seq_lens.fill_(1)
            return metadata

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False) -> FrugalAttentionMetadata:
            m = common_attn_metadata
            return FrugalAttentionMetadata(
                num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
                max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc[: m.num_reqs + 1],
                seq_lens=m.seq_lens[: m.num_reqs], block_table=m.block_table_tensor,
                slot_mapping=m.slot_mapping, causal=m.causal,
            )

    class FrugalAttentionBackend(AttentionBackend):
        accept_output_buffer = True  # read by vLLM <= 0.17; harmless after
        forward_includes_kv_cache_update = False  # vLLM calls impl.do_kv_cache_update first
        supported_dtypes = list(SUPPORTED_DTYPES)
        supported_kv_cache_dtypes = list(_SUPPORTED_KV_CACHE_DTYPES)

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"  # the Attention layer looks its enum member up by this name

        @staticmethod
        def get_impl_cls():
            return FrugalAttentionImpl

        @staticmethod
        def get_builder_cls():
            return FrugalAttentionMetadataBuilder

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(16)]  # the kernels take any page size; 16 as vLLM's Triton backend

        @classmethod
        def get_supported_head_sizes(cls) -> list[int]:
            return list(SUPPORTED_HEAD_DIMS)

        @classmethod
        def supports_compute_capability(cls, capability) -> bool:
            return capability is None or capability.major >= 8

        if release.backend_sets_kv_shape:  # vLLM 0.24: each backend declares its cache shape

            @staticmethod
            def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size,
                                   cache_dtype_str="auto") -> tuple[int, ...]:
                return kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    class FrugalAttentionImpl(AttentionImpl[FrugalAttentionMetadata]):
        def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                     sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                     attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, **extra):
            num_kv_heads = num_kv_heads or num_heads
            # Other extras vLLM may pass (use_alibi_sqrt, chunk_lookback): only their off values.
            unknown = {k: v for k, v in extra.items()
                       if k != "sinks" and not (v is None or v is False or v == -1)}
            reasons = unsupported_reasons(
                head_size=head_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                alibi_slopes=alibi_slopes, sliding_window=sliding_window,
                kv_cache_dtype=kv_cache_dtype, logits_soft_cap=logits_soft_cap,
                attn_type=attn_type, sinks=extra.get("sinks"),
            ) + [f"option {k}={v!r}" for k, v in unknown.items()]
            if reasons:
                raise NotImplementedError(
                    "frugalserve's attention backend (CUSTOM) does not support: " + "; ".join(reasons)
                    + ". Pick another backend with attention_backend=... for this model."
                )
            self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
            self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_size)
            self.kv_cache_dtype = kv_cache_dtype
            self.attn_type = attn_type
            self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
            self.alibi_slopes = (None if alibi_slopes is None
                                 else torch.tensor(alibi_slopes, dtype=torch.float32))

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
            # fp8: the byte cache viewed as e4m3 (vLLM's Triton writer cannot store into uint8)
            key_cache, value_cache = split_kv_cache(kv_cache, self.head_size, self.kv_cache_dtype)
            if key_cache.is_cuda:  # vLLM's own writer for this layout: no host sync on padding
                from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
                    triton_reshape_and_cache_flash,
                )

                triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                               self.kv_cache_dtype, layer._k_scale, layer._v_scale)
            else:
                write_kv(key, value, key_cache, value_cache, slot_mapping, getattr(layer, "_k_scale", None),
                         getattr(layer, "_v_scale", None))

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            """query [T, Hq, D] (K/V already in kv_cache); writes output [T, Hq, D] in place."""
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("frugalserve's attention backend has no fused output quantization")
            if attn_metadata is None:  # vLLM's memory-profiling run
                return output.fill_(0)
            if attn_metadata.causal is not True:
                raise NotImplementedError("frugalserve's attention backend is causal only")
            n = attn_metadata.num_actual_tokens
            key_cache, value_cache = split_kv_cache(kv_cache, self.head_size, self.kv_cache_dtype)
            if self.alibi_slopes is not None and self.alibi_slopes.device != query.device:
                self.alibi_slopes = self.alibi_slopes.to(query.device)
            out = output[:n].view(n, self.num_heads, self.head_size)
            attend(query[:n].reshape(n, self.num_heads, self.head_size), key_cache, value_cache,
                   attn_metadata.block_table, attn_metadata.query_start_loc, attn_metadata.seq_lens, out,
                   max_query_len=attn_metadata.max_query_len, scale=self.scale,
                   alibi_slopes=self.alibi_slopes, k_scale=getattr(layer, "_k_scale", None),
                   v_scale=getattr(layer, "_v_scale", None))
            return output

    classes = {c.__name__: c for c in (FrugalAttentionMetadata, FrugalAttentionMetadataBuilder,
                                        FrugalAttentionBackend, FrugalAttentionImpl)}
    for cls in classes.values():
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    return classes
