"""Forward passes over a paged KV cache for the model families the paged engine runs.

A paged model wraps a loaded Hugging Face model and reuses its modules (embeddings, norms,
projections, MLPs — quantized ones too); only the attention differs: the tokens of one step are
packed into one flat batch `[T, ...]` (prefill chunks and decode tokens together) and each layer
calls `attend(layer, q, k, v)`, which writes K/V into the cache and attends over it
(experts/paged/runner.py). Supported: Llama-style decoders (llama, mistral, qwen2, qwen3 —
without sliding windows) and Falcon (ALiBi or rotary; grouped, multi-query or full KV heads).
Anything else runs on the plain transformers engine; `paged_model_for` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from frugalserve.kernels.alibi import alibi_slopes

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """The model has no paged implementation; the message says why."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D]: transformers' apply_rotary_pos_emb."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_tables(rotary_emb, max_positions: int, like: torch.Tensor):
    """cos/sin [max_positions, D] from the model's own rotary module (its scaling rules
    included), computed once so a step only indexes them (capturable in a CUDA graph)."""
    positions = torch.arange(max_positions, device=like.device)[None]
    cos, sin = rotary_emb(like, position_ids=positions)
    return cos[0].contiguous(), sin[0].contiguous()


class PagedModel:
    """Common surface: shapes of the cache, `forward(ids, positions, attend) -> hidden [T, H]`
    (after the final norm), `logits(hidden) -> [N, vocab]`."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    alibi: torch.Tensor | None  # [num_heads] slopes already in the scaled-logit domain, or None

    def __init__(self, model, max_positions: int):
        self.model = model
        self.config = model.config
        self.max_positions = max_positions
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype if p.dtype.is_floating_point else torch.float16

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)


class PagedLlama(PagedModel):
    family = "llama"

    def __init__(self, model, max_positions: int):
        super().__init__(model, max_positions)
        c = self.config
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(attn, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.alibi = None
        self.qk_norm = hasattr(attn, "q_norm")  # qwen3
        self.cos, self.sin = _rope_tables(model.model.rotary_emb, max_positions,
                                          torch.zeros(1, device=self.device, dtype=self.dtype))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        m = self.model.model
        T, D = ids.shape[0], self.head_dim
        h = m.embed_tokens(ids)
        cos, sin = self.cos[positions], self.sin[positions]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(T, -1, D)
            k = a.k_proj(x).view(T, -1, D)
            v = a.v_proj(x).view(T, -1, D)
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = _rope(q, k, cos, sin)
            h = h + a.o_proj(attend(i, q, k, v).reshape(T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.norm(h)


class PagedFalcon(PagedModel):
    family = "falcon"

    def __init__(self, model, max_positions: int):
        super().__init__(model, max_positions)
        c = self.config
        t = model.transformer
        self.layers = list(t.h)
        attn = self.layers[0].self_attention
        self.num_layers = len(self.layers)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.inv_norm_factor)
        self.new_arch = bool(c.new_decoder_architecture)
        self.multi_query = bool(c.multi_query)
        self.two_ln = self.new_arch and getattr(c, "num_ln_in_parallel_attn", 2) == 2
        self.parallel = bool(c.parallel_attn) or self.new_arch
        # Falcon computes (q.k + slope * pos) / sqrt(d): the bias is scaled with the logits.
        self.alibi = (alibi_slopes(self.num_heads, device=self.device) * self.scale
                      if c.alibi else None)
        if self.alibi is None:
            self.cos, self.sin = _rope_tables(t.rotary_emb, max_positions,
                                              torch.zeros(1, device=self.device, dtype=self.dtype))

    def _split(self, fused: torch.Tensor):
        """fused [T, ...] -> q [T, Hq, D], k/v [T, Hkv, D] (K/V heads never broadcast)."""
        T, H, D, kv = fused.shape[0], self.num_heads, self.head_dim, self.num_kv_heads
        if self.new_arch:
            qkv = fused.view(T, kv, H // kv + 2, D)
            return qkv[:, :, :-2].reshape(T, H, D), qkv[:, :, -2], qkv[:, :, -1]
        if not self.multi_query:
            qkv = fused.view(T, H, 3, D)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        qkv = fused.view(T, H + 2, D)
        return qkv[:, :-2], qkv[:, -2:-1], qkv[:, -1:]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        t = self.model.transformer
        T = ids.shape[0]
        h = t.word_embeddings(ids)
        if self.alibi is None:
            cos, sin = self.cos[positions], self.sin[positions]
        for i, layer in enumerate(self.layers):
            a = layer.self_attention
            if self.two_ln:
                xa, xm = layer.ln_attn(h), layer.ln_mlp(h)
            else:
                xa = xm = layer.input_layernorm(h)
            q, k, v = self._split(a.query_key_value(xa))
            if self.alibi is None:
                q, k = _rope(q, k, cos, sin)
            out = a.dense(attend(i, q.contiguous(), k.contiguous(), v.contiguous()).reshape(T, -1))
            if self.parallel:
                mlp = layer.mlp(xm)
                mlp += out
                h = h + mlp
            else:
                h = h + out
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return t.ln_f(h)


def paged_model_for(model, max_positions: int) -> PagedModel:
    """The paged implementation of `model`, or `UnsupportedModel` saying why there is none."""
    c = model.config
    kind = getattr(c, "model_type", None)
    if getattr(model, "peft_config", None):
        raise UnsupportedModel("LoRA adapters are served by the plain engine (peft mixes "
                               "adapters per row of a padded batch)")
    if kind in LLAMA_STYLE:
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            raise UnsupportedModel(f"{kind} with a sliding window ({c.sliding_window})")
        if getattr(c, "layer_types", None) and any(t != "full_attention" for t in c.layer_types):
            raise UnsupportedModel(f"{kind} with layer types {sorted(set(c.layer_types))}")
        return PagedLlama(model, max_positions)
    if kind == "falcon":
        return PagedFalcon(model, max_positions)
    raise UnsupportedModel(f"model type {kind!r} has no paged implementation "
                           f"(paged: {', '.join(LLAMA_STYLE)}, falcon)")
