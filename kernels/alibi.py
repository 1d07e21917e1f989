"""ALiBi slopes (Press et al., "Train Short, Test Long"), shared by kernels, references and model patches."""

from __future__ import annotations

import math

import torch


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # 2^(-8/n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes_list(num_heads: int) -> list[float]:
    """Slopes m_1..m_n; for n not a power of two, the paper's rule (as in transformers' Bloom/Falcon):
    the slopes of the closest power of two c below n, then every other slope of 2c for the rest."""
    if num_heads < 1:
        raise ValueError(f"alibi_slopes needs num_heads >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = _power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return slopes


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 tensor [num_heads]. The bias added to head h's logit for query i, key j is
    `slopes[h] * (j - i)` (<= 0 under a causal mask)."""
    return torch.tensor(alibi_slopes_list(num_heads), dtype=torch.float32, device=device)
