"""Plugging the kernels into transformers.

- Llama/Mistral/Qwen-style models (those that look their attention up in `AttentionInterface`):
  `attn_implementation="frugalserve"`, registered with `AttentionInterface` and, under the same name,
  `AttentionMaskInterface` (without a mask function transformers would pass attention_mask=None).
- Falcon with `alibi=True`: its attention bypasses `AttentionInterface` and transformers folds
  ALiBi into an O(B*H*S^2) float mask; `enable_for_model` replaces each FalconAttention.forward with
  one that calls our kernel with slopes, and the mask function hands Falcon only the 2-D padding mask
  so the O(S^2) bias is never built.

Engine API: `attn_implementation_for(config)` before `from_pretrained`, `enable_for_model(model)` after.
"""

from __future__ import annotations

import logging
import types

import torch

from . import dispatch
from .alibi import alibi_slopes

logger = logging.getLogger("frugalserve.kernels")
NAME = "frugalserve"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


def _is_falcon_alibi(config) -> bool:
    return getattr(config, "model_type", None) == "falcon" and bool(getattr(config, "alibi", False))


def _mask(*args, config=None, **kwargs):
    """Mask function under our name: Falcon+ALiBi gets the 2-D padding mask (or None); others sdpa's."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    if config is not None and _is_falcon_alibi(config):
        padding = prepare_padding_mask(kwargs.get("attention_mask"), kwargs["kv_length"], kwargs.get("kv_offset", 0))
        if padding is None or bool(padding.all()):
            return None
        return padding  # [B, kv_length] bool, ndim 2: Falcon skips its O(S^2) ALiBi fold
    return sdpa_mask(*args, config=config, **kwargs)


def _left_padding(mask: torch.Tensor, sq: int, sk: int, causal: bool) -> torch.Tensor | None:
    """kv_lo [B] if the bool mask [B, 1|H, Sq, Sk] is (causal and) left padding, else None."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        return None
    m = mask[:, 0]
    kv_lo = (sk - m[:, -1, :].sum(-1)).to(torch.int32)  # the last query row sees every real key
    k_pos = torch.arange(sk, device=mask.device)
    q_pos = torch.arange(sq, device=mask.device) + (sk - sq)
    expect = k_pos.view(1, 1, sk) >= kv_lo.view(-1, 1, 1)
    if causal:
        expect = expect & (k_pos.view(1, 1, sk) <= q_pos.view(1, sq, 1))
    real_rows = q_pos.view(1, sq, 1) >= kv_lo.view(-1, 1, 1)  # padding query rows are don't-care
    return kv_lo if bool(((m == expect) | ~real_rows).all()) else None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (after the cache
    update) -> ([B, Sq, Hq, D], None)."""
    unsupported = [n for n in _UNSUPPORTED_KWARGS if kwargs.get(n) is not None]
    if dropout or unsupported or kwargs.get("output_attentions"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        dispatch._log_once(f"hf attention: transformers' sdpa fallback ({unsupported or 'dropout/output_attentions'})")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, S, H, D] views
    sq, sk = q.shape[1], k.shape[1]
    kv_lo, mask = None, None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:  # additive float mask
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        kv_lo = _left_padding(attention_mask, sq, sk, causal)
        if kv_lo is None:
            mask = attention_mask
        elif not bool(kv_lo.any()):
            kv_lo = None
    if mask is not None:
        out = dispatch.attention(q, k, v, causal=False, scale=scaling, attn_mask=mask)
    else:
        out = dispatch.attention(q, k, v, causal=causal, scale=scaling, kv_lo=kv_lo)
    return out, None


def register() -> str:
    """Register NAME with transformers' attention and mask interfaces (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def attn_implementation_for(config=None) -> str | None:
    """The `attn_implementation` to pass to from_pretrained: NAME for models that use AttentionInterface,
    None (keep transformers' default) for Falcon, whose ALiBi adapter is applied by enable_for_model."""
    register()
    if config is not None and getattr(config, "model_type", None) in ("falcon", "bloom", "mpt"):
        return None
    return NAME


# ---- Falcon (ALiBi) -------------------------------------------------------------------------------


def _falcon_split(self, fused: torch.Tensor):
    """fused [B, S, ...] -> q [B, S, H, D], k/v [B, S, Hkv, D] (no broadcast of K/V to all heads)."""
    B, S, _ = fused.shape
    H, D = self.num_heads, self.head_dim
    if self.new_decoder_architecture:
        qkv = fused.view(B, S, self.num_kv_heads, H // self.num_kv_heads + 2, D)
        return qkv[:, :, :, :-2].reshape(B, S, H, D), qkv[:, :, :, -2], qkv[:, :, :, -1]
    if not self.multi_query:
        qkv = fused.view(B, S, H, 3, D)
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    qkv = fused.view(B, S, H + 2, D)
    return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]


def _falcon_alibi_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                          use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    q, k, v = _falcon_split(self, self.query_key_value(hidden_states))
    B, S = q.shape[:2]
    if layer_past is not None:  # the cache holds [B, Hkv, S, D]: GQA/MQA heads are not broadcast
        k, v = layer_past.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    slopes = getattr(self, "_frugalserve_slopes", None)
    if slopes is None or slopes.device != q.device:
        # Falcon computes (q.k + slope*pos) / sqrt(d): the bias is scaled with the logits
        slopes = alibi_slopes(self.num_heads, device=q.device) * self.inv_norm_factor
        self._frugalserve_slopes = slopes
    kv_lo, mask = None, None
    if attention_mask is not None:  # [B, Sk] bool padding mask from our mask function
        if attention_mask.dim() != 2:
            raise ValueError("frugalserve Falcon adapter expects the 2-D padding mask of its mask function; "
                             f"got {attention_mask.dim()}-D (was config._attn_implementation changed?)")
        sk = k.shape[1]
        kv_lo = (sk - attention_mask.sum(-1)).to(torch.int32)
        if not bool((attention_mask == (torch.arange(sk, device=q.device) >= kv_lo[:, None])).all()):
            kv_lo, mask = None, attention_mask[:, None, None, :].expand(B, 1, S, sk)
            mask = mask & (torch.arange(sk, device=q.device) <= torch.arange(S, device=q.device)[:, None] + sk - S)
    out = dispatch.attention(q, k, v, causal=mask is None, alibi_slopes=slopes, scale=self.inv_norm_factor,
                             kv_lo=kv_lo, attn_mask=mask)
    return self.dense(out.reshape(B, S, self.num_heads * self.head_dim)), None


def _head_layout(config) -> tuple[int, int, int]:
    """(head_dim, num_heads, num_kv_heads) of the model's attention, as its attention modules read it."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "model_type", None) == "falcon":  # as FalconAttention
        multi_kv = config.new_decoder_architecture or not config.multi_query
        kv_heads = config.num_kv_heads if multi_kv else 1
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return head_dim, heads, kv_heads


def kernel_report(model) -> str:
    """What attention runs for `model` where it is now (device, dtype) and why: the prefill kernel's
    decision (transformers' attention calls go through it, decode steps included)."""
    params = list(model.parameters())
    param = next((p for p in params if p.is_floating_point()), params[0])  # not a quantized int8 weight
    try:
        head_dim, heads, kv_heads = _head_layout(model.config)
        d = dispatch.decide("prefill", param.device, param.dtype, head_dim, heads, kv_heads)
    except (AttributeError, TypeError, ValueError) as exc:  # a config without the usual head fields
        ok, reason = dispatch.choose(param.device)
        return (f"{'triton kernels' if ok else 'reference path'}: {reason}; head layout not read from the "
                f"config ({exc}), each call decides from its tensors")
    return f"{'triton kernels' if d.use_triton else 'reference path'}: {d.reason}"


def _enable_falcon_alibi(model) -> str:
    from transformers.models.falcon.modeling_falcon import FalconAttention

    register()
    patched = 0
    for module in model.modules():
        if isinstance(module, FalconAttention):
            module.forward = types.MethodType(_falcon_alibi_forward, module)
            patched += 1
    model.config._attn_implementation = NAME  # mask: our 2-D padding mask, not the O(S^2) ALiBi bias
    return (f"falcon ALiBi adapter on {patched} attention layers (slopes passed to the attention, no O(S^2) "
            f"bias; {kernel_report(model)})")


def enable_for_model(model) -> str:
    """Route `model`'s attention through frugalserve's dispatch; returns what was enabled and whether
    the Triton kernels or the reference will run it (dispatch.decide for the model's device, dtype and
    head layout), or why nothing was enabled."""
    config = model.config
    if _is_falcon_alibi(config):
        if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa", NAME):
            return f"nothing enabled: Falcon ALiBi with attn_implementation={config._attn_implementation!r}"
        return _enable_falcon_alibi(model)
    if getattr(config, "model_type", None) in ("falcon", "bloom", "mpt"):
        return f"nothing enabled: {config.model_type} attention does not go through AttentionInterface"
    register()
    try:
        model.set_attn_implementation(NAME)
    except Exception as exc:  # models that do not support custom attention functions
        return f"nothing enabled: set_attn_implementation({NAME!r}) failed: {exc}"
    return f"attn_implementation={NAME!r} ({kernel_report(model)})"


__all__ = ["NAME", "attention_forward", "attn_implementation_for", "enable_for_model", "kernel_report", "register"]
