"""bitsandbytes quantization for the transformers engine: 8-bit (LLM.int8) and 4-bit NF4 with
optional double quantization. bitsandbytes ≥ 0.47 runs both on CPU as well as CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from frugalserve.experts.memory import weight_bytes as stored_bytes


def quantization_config(kind: str, double_quant: bool = True, compute_dtype=None):
    """A transformers `BitsAndBytesConfig` for `int8` or `nf4`; None for `none`."""
    if kind == "none":
        return None
    try:  # bitsandbytes is the optional quant extra: without it, only `none` works
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ValueError(
            f"quantization {kind!r} needs bitsandbytes: install the extra with "
            "`pip install 'frugalserve[quant]'`") from None
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"unknown quantization {kind!r}; use none, int8 or nf4")


def weight_bytes(model) -> int:
    """Bytes the weights really take: packed 4-bit and 8-bit storage plus quantization state."""
    return stored_bytes(model)


def check_cpu_4bit(model_path, block: int = 64, rows: int = 32) -> None:
    """bitsandbytes' CPU NF4 kernels need every linear layer's input width to be a multiple of
    the quantization block (64) and its output width a multiple of 32; refuse clearly instead of
    failing mid-request."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    hidden = cfg.get("hidden_size")
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    ffn = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or (4 * hidden if hidden else None)
    ins = {hidden, ffn}
    outs = {hidden, ffn}
    if head_dim and heads:
        outs |= {heads * head_dim, kv * head_dim, (heads + 2 * kv) * head_dim}
    bad_in = sorted(w for w in ins if isinstance(w, int) and w % block)
    bad_out = sorted(w for w in outs if isinstance(w, int) and w % rows)
    if bad_in or bad_out:
        raise ValueError(
            f"nf4 on CPU needs layer input widths that are multiples of {block} and output widths "
            f"that are multiples of {rows}; {model_path} has inputs {bad_in} and outputs "
            f"{bad_out} that are not: use int8, a GPU, or another model")


def linear_weight_bytes(model) -> int:
    """Bytes of the quantizable weight matrices (linear layers except the output head),
    NF4 block constants included: what bitsandbytes shrinks."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            w = module.weight
            total += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is not None and getattr(state, "absmax", None) is not None:
                total += state.absmax.numel() * state.absmax.element_size()
    return total
