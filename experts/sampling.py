"""Token choice for a batch where each row has its own sampling settings (vLLM's sampler order).

For each row: logit bias, the tokens it may not pick (end tokens before `min_tokens`), the
structured-output grammar's mask, then repetition / presence / frequency penalties; greedy rows
take the argmax of that; sampled rows divide by their temperature, drop tokens under `min_p` ×
the best token's probability, keep the `top_k` most likely and the `top_p` nucleus, and draw with
the exponential race (argmax of p / q, q ~ Exp(1)) from their own seeded generator, so a seed
gives the same tokens whatever shares the batch. A batch of greedy rows with nothing to apply is
one argmax. `top_logprobs` are read from the raw logits (vLLM's default `raw_logprobs`), as the
sampled token's logprob is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from frugalserve.experts.engine import SamplingParams


@dataclass(eq=False)
class RowState:
    """One request's (one choice's) sampling state across steps: its random stream, its tokens
    so far (`tokens[num_prompt:]` are generated; the list is the engine's own, read live), its
    grammar matcher, and the top logprobs recorded per token chosen."""

    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    num_prompt: int = 0
    matcher: Any = None  # frugalserve.experts.structured.Matcher
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]


def needs_state(params: SamplingParams) -> bool:
    return params.processed


def choose_tokens(
    logits: torch.Tensor,  # [batch, vocab], float32
    params: Sequence[SamplingParams],
    states: Sequence[RowState | None],
    suppress: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The next token of every row. `suppress[i]`: token ids row i must not pick (end tokens
    before its `min_tokens`). `states[i]` is None for a plain greedy row."""
    rows = range(len(params))
    banned = suppress is not None and any(suppress)
    if not banned and all(s is None for s in states):
        return logits.argmax(dim=-1)  # the greedy-only batch
    logits = logits.clone()
    for i in rows:
        s, p = states[i], params[i]
        if s is not None and p.top_logprobs > 0:
            lp = torch.log_softmax(logits[i], dim=-1)
            values, ids = lp.topk(p.top_logprobs)
            s.top.append(tuple(zip(ids.tolist(), values.tolist())))
        if p.logit_bias:
            biased, bias = zip(*p.logit_bias)
            logits[i, list(biased)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if suppress is not None and suppress[i]:
            logits[i, list(suppress[i])] = float("-inf")
        if s is not None and s.matcher is not None:
            s.matcher.mask(logits[i])
    _penalize(logits, params, states)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i in rows if params[i].temperature > 0]
    if sampled:
        picked = _sample(logits[sampled], [params[i] for i in sampled],
                         [states[i] for i in sampled])
        chosen[sampled] = picked
    for i in rows:
        s = states[i]
        if s is not None and s.matcher is not None:
            s.matcher.accept(int(chosen[i]))
    return chosen


def _penalize(logits: torch.Tensor, params: Sequence[SamplingParams],
              states: Sequence[RowState | None]) -> None:
    """Repetition (prompt + answer so far), presence and frequency (answer so far), in place."""
    rows = [i for i, p in enumerate(params) if states[i] is not None and (
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)]
    if not rows:
        return
    vocab, dev = logits.shape[-1], logits.device
    counts = torch.zeros((len(rows), vocab), dtype=logits.dtype, device=dev)
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=dev)
    for j, i in enumerate(rows):
        s = states[i]
        assert s is not None
        out = torch.tensor(s.generated, dtype=torch.long, device=dev)
        if out.numel():
            counts[j] = torch.bincount(out.clamp(max=vocab - 1), minlength=vocab)[:vocab].to(counts.dtype)
        every = torch.tensor(s.tokens, dtype=torch.long, device=dev)
        if every.numel():
            seen[j, every.clamp(max=vocab - 1)] = True
    sub = logits[rows]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev)[:, None]
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev)[:, None]
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[rows] = sub


def _sample(logits: torch.Tensor, params: Sequence[SamplingParams],
            states: Sequence[RowState | None]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p, then one draw per row from its own generator."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    if bool((min_p > 0).any()):
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    tops = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    if min(ks) < vocab or bool((tops < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        keep = rank < torch.tensor(ks, device=dev)[:, None]
        keep &= sorted_p.cumsum(-1) - sorted_p < tops  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    q = torch.empty_like(probs)
    for j, s in enumerate(states):
        q[j].exponential_(generator=s.generator if s is not None else None)
    return (probs / q).argmax(dim=-1)


def check_params(params: SamplingParams, vocab_size: int, grammars, name: str) -> None:
    """Admission: what the transformers engines cannot honour fails the request alone, naming
    the field (`UnsupportedFeatureError`)."""
    from frugalserve.experts.engine import UnsupportedFeatureError

    bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise UnsupportedFeatureError(f"logit_bias names token ids {bad} outside expert {name!r}'s "
                                      f"vocabulary of {vocab_size}", "logit_bias")
    if params.guide is not None:
        grammars.check(params.guide, name)


def row_state(params: SamplingParams, tokens: list[int], num_prompt: int, grammars,
              device: torch.device) -> RowState | None:
    """The state one sequence samples with, or None for a plain greedy one."""
    if not params.processed:
        return None
    generator = None
    if params.temperature > 0:
        import time

        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else time.time_ns() % 2**63)
    matcher = grammars.matcher(params.guide) if params.guide is not None else None
    return RowState(generator, tokens, num_prompt, matcher)
