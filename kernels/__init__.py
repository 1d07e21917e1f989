"""frugalserve.kernels: Triton attention kernels (flash prefill, paged decode, paged prefill for mixed
steps) with ALiBi and GQA/MQA, a paged KV-cache writer, a PyTorch reference beside each, and adapters
into transformers.

Importing this package needs neither CUDA nor Triton: the kernels are imported lazily, and
`dispatch` decides (once, logged) whether Triton or the reference runs.
"""

from .alibi import alibi_slopes, alibi_slopes_list
from .dispatch import (
    KernelDecision,
    attention,
    attention_varlen,
    decide,
    decode,
    paged_prefill,
    write_kv,
)
from .dispatch import choose as choose_backend
from .kv_cache import write_kv_cache

__all__ = [
    "KernelDecision",
    "alibi_slopes",
    "alibi_slopes_list",
    "attention",
    "attention_varlen",
    "decide",
    "decode",
    "choose_backend",
    "paged_prefill",
    "write_kv",
    "write_kv_cache",
]
