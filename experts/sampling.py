"""Token choice for a batch where each row has its own sampling settings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from frugalserve.experts.engine import SamplingParams


def choose_tokens(
    logits: torch.Tensor,  # [batch, vocab], float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    suppress: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Greedy where temperature is 0; else temperature + nucleus (top_p) sampling, each row
    drawn from its own seeded generator so a seed gives the same answer in any batch.
    `suppress[i]`: token ids row i must not pick (end tokens before its `min_tokens`)."""
    if suppress is not None and any(suppress):
        logits = logits.clone()
        for i, ids in enumerate(suppress):
            if ids:
                logits[i, list(ids)] = float("-inf")
    chosen = logits.argmax(dim=-1)
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the top token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        chosen[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen
