"""The response matrix: every expert's answer to every prompt, with correctness and cost.

Rows come from the evaluation harness (`frugalserve eval`), one JSON object per prompt × expert.
`ResponseMatrix` pivots them into aligned arrays so policies can be replayed without inference.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED_KEYS = (
    "expert", "prompt", "answer", "correct", "logprob_mean", "logprob_min", "logprob_first",
    "prompt_tokens", "completion_tokens", "cost",
)


@dataclass
class ResponseMatrix:
    """Aligned arrays over `n` prompts × `e` experts."""

    experts: list[str]
    prompt_ids: list[str]
    prompts: list[str]
    domains: list[str]
    difficulties: list[str]
    correct: np.ndarray  # [n, e] bool
    cost: np.ndarray  # [n, e] cost units
    answers: list[list[str]]  # [n][e]
    rows: list[list[dict]] = field(repr=False, default_factory=list)  # [n][e] the raw rows

    @property
    def n(self) -> int:
        return len(self.prompts)

    def column(self, expert: str) -> int:
        try:
            return self.experts.index(expert)
        except ValueError:
            raise KeyError(f"expert {expert!r} is not in the matrix: {self.experts}") from None

    def subset(self, idx: Sequence[int] | np.ndarray) -> ResponseMatrix:
        idx = list(np.asarray(idx, dtype=int))
        return ResponseMatrix(
            experts=list(self.experts),
            prompt_ids=[self.prompt_ids[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            domains=[self.domains[i] for i in idx],
            difficulties=[self.difficulties[i] for i in idx],
            correct=self.correct[idx],
            cost=self.cost[idx],
            answers=[self.answers[i] for i in idx],
            rows=[self.rows[i] for i in idx] if self.rows else [],
        )

    def select(self, experts: Sequence[str]) -> ResponseMatrix:
        """The same prompts with only these experts' columns."""
        cols = [self.column(e) for e in experts]
        return ResponseMatrix(
            experts=list(experts), prompt_ids=list(self.prompt_ids), prompts=list(self.prompts),
            domains=list(self.domains), difficulties=list(self.difficulties),
            correct=self.correct[:, cols], cost=self.cost[:, cols],
            answers=[[a[c] for c in cols] for a in self.answers],
            rows=[[r[c] for c in cols] for r in self.rows] if self.rows else [],
        )

    def mean_cost(self) -> np.ndarray:
        return self.cost.mean(axis=0)

    def accuracy(self) -> np.ndarray:
        return self.correct.mean(axis=0)

    @classmethod
    def from_rows(cls, rows: Iterable[dict], experts: Sequence[str] | None = None) -> ResponseMatrix:
        by_prompt: dict[str, dict[str, dict]] = {}
        order: list[str] = []
        seen_experts: list[str] = []
        for i, row in enumerate(rows):
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise ValueError(f"response matrix row {i} lacks keys {missing}")
            key = str(row.get("id") or row["prompt"])
            if key not in by_prompt:
                by_prompt[key] = {}
                order.append(key)
            by_prompt[key][row["expert"]] = row
            if row["expert"] not in seen_experts:
                seen_experts.append(row["expert"])
        experts = list(experts or seen_experts)
        complete = [k for k in order if all(e in by_prompt[k] for e in experts)]
        if not complete:
            raise ValueError(f"no prompt has answers from every expert {experts}")
        grid = [[by_prompt[k][e] for e in experts] for k in complete]
        return cls(
            experts=experts,
            prompt_ids=complete,
            prompts=[g[0]["prompt"] for g in grid],
            domains=[str(g[0].get("domain", "")) for g in grid],
            difficulties=[str(g[0].get("difficulty", "")) for g in grid],
            correct=np.array([[bool(r["correct"]) for r in g] for g in grid]),
            cost=np.array([[float(r["cost"]) for r in g] for g in grid]),
            answers=[[str(r["answer"]) for r in g] for g in grid],
            rows=grid,
        )

    @classmethod
    def load(cls, path: str | Path, experts: Sequence[str] | None = None) -> ResponseMatrix:
        path = Path(path)
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"response matrix {path} is empty")
        return cls.from_rows(rows, experts)
