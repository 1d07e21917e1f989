"""What the paged KV cache stores, and the fp8 scales calibrated for it at load.

`kv_cache.dtype: fp8` keeps K/V as float8 e4m3 (1 byte per element) with one float32 scale per layer and KV
head; a value is stored as `clamp(x / scale, -448, 448)` and read back as `stored x scale`
(frugalserve.kernels.kv_cache). The scales come from a calibration pass when the engine loads: the model runs
a few short built-in prompts (prefill only, attention over the prompt itself, no cache), the largest |K| and
|V| after the projections (and RoPE, as the cache holds them) are taken per layer and KV head, and

    scale = max(amax x CALIBRATION_MARGIN, 1e-6) / 448

so the calibrated values use half of e4m3's range and a value up to twice the largest seen still fits; larger
ones saturate at +-448 x scale. e4m3's relative precision (3 mantissa bits) is the same at every magnitude
down to 2^-6 x 448 x scale, so the margin costs nothing there. The scales stay fixed while serving (graphs
captured with them replay them).
"""

from __future__ import annotations

import torch
from frugalserve.experts.engine_config import kv_cache_dtype_name
from frugalserve.kernels import dispatch
from frugalserve.kernels.kv_cache import FP8_DTYPE, FP8_MAX

CALIBRATION_MARGIN = 2.0
CALIBRATION_TOKENS = 256  # per prompt at most
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.",
    "Question: what is 17 * 23 + 408 / 12? Answer step by step, then give the final number.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "User: Summarise the causes of the French Revolution in three sentences.\nAssistant: In 1789,",
)
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's torch dtype for kv_cache.dtype `name`: the model's for auto, float8_e4m3fn for fp8; an
    explicit float dtype must be the model's (the cache holds what the attention computes in, or fp8)."""
    canonical = kv_cache_dtype_name(name)
    if canonical == "auto":
        return model_dtype
    if canonical == "fp8":
        return FP8_DTYPE
    dtype = _TORCH_DTYPES[canonical]
    if dtype != model_dtype:
        raise ValueError(f"kv_cache.dtype {name!r} differs from the model's {str(model_dtype).removeprefix('torch.')}:"
                         " the cache holds the model's dtype (auto) or fp8")
    return dtype


def calibration_prompts(tokenizer, vocab_size: int, max_tokens: int) -> list[list[int]]:
    """Token ids of the built-in calibration texts (at most `max_tokens` each); seeded random ids where
    the tokenizer gives nothing."""
    prompts: list[list[int]] = []
    for text in CALIBRATION_TEXTS:
        try:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        except Exception:  # noqa: BLE001 - any tokenizer failure: fall back to random ids below
            ids = []
        ids = [i for i in ids if 0 <= i < vocab_size][:max_tokens]
        if len(ids) < 2:
            g = torch.Generator().manual_seed(len(prompts))
            ids = torch.randint(0, vocab_size, (min(64, max_tokens),), generator=g).tolist()
        prompts.append(ids)
    return prompts


@torch.inference_mode()
def calibrate_kv_scales(paged, prompts: list[list[int]], margin: float = CALIBRATION_MARGIN,
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, float32 [num_kv_heads] K and V scales on the model's device: the amax of K and V per KV head
    over `prompts` (each run alone, causal attention over itself) x `margin` / 448."""
    L, H = paged.num_layers, paged.num_kv_heads
    amax_k = torch.zeros(L, H, device=paged.device, dtype=torch.float32)
    amax_v = torch.zeros_like(amax_k)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        amax_k[layer] = torch.maximum(amax_k[layer], k.detach().abs().amax(dim=(0, 2)).float())
        amax_v[layer] = torch.maximum(amax_v[layer], v.detach().abs().amax(dim=(0, 2)).float())
        return dispatch.attention(q[None], k[None], v[None], causal=True, alibi_slopes=paged.alibi,
                                  scale=paged.scale, autotune=False)[0]

    for ids in prompts:
        t = torch.tensor(ids, dtype=torch.long, device=paged.device)
        paged.forward(t, torch.arange(len(ids), device=paged.device), attend)
    k_scales = (amax_k * margin).clamp_min(1e-6) / FP8_MAX
    v_scales = (amax_v * margin).clamp_min(1e-6) / FP8_MAX
    return list(k_scales.unbind(0)), list(v_scales.unbind(0))
