"""The routing record: which experts ran for one request, what each cost, who answered.

It is the response's `frugalserve` object and what the metrics count. A run is added with its
completion and the expert's prices, so the record keeps its own tokens and cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from frugalserve.experts.engine import Completion


@dataclass(frozen=True)
class Prices:
    """An expert's cost units per 1k prompt and per 1k completion tokens."""

    per_1k_prompt: float
    per_1k_completion: float

    @classmethod
    def of(cls, info: dict[str, Any]) -> Prices:
        """From an expert's `info()`."""
        return cls(float(info["cost_per_1k_prompt"]), float(info["cost_per_1k_completion"]))

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.per_1k_prompt + completion_tokens * self.per_1k_completion) / 1000.0


@dataclass
class ExpertRun:
    """What one expert did for a request: the routing record's unit."""

    expert: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "expert": self.expert,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 9),
            **self.extra,
        }


@dataclass
class RoutingRecord:
    """The `frugalserve` object of a response: which experts ran and what it cost."""

    policy: str
    runs: list[ExpertRun] = field(default_factory=list)
    answered_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, expert: str, c: Completion, prices: Prices, **extra: Any) -> ExpertRun:
        """Record `expert`'s run; it answers the request unless a later run (or the policy) says
        otherwise."""
        run = ExpertRun(expert, c.prompt_tokens, c.generated_tokens,
                        prices.cost(c.prompt_tokens, c.generated_tokens), extra)
        self.runs.append(run)
        self.answered_by = expert
        return run

    def note_retries(self, retries: list[dict[str, Any]]) -> None:
        """The attempts that failed before one answered (expert, status, code, when)."""
        if retries:
            self.details["retries"] = list(retries)

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.runs)

    def usage(self, final: Completion) -> dict[str, int]:
        # Usage counts every token the request made the experts process, not only the answer's.
        prompt = sum(r.prompt_tokens for r in self.runs) or final.prompt_tokens
        completion = sum(r.completion_tokens for r in self.runs) or final.generated_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "answered_by": self.answered_by,
            "experts": [r.expert for r in self.runs],
            "runs": [r.as_dict() for r in self.runs],
            "cost": round(self.cost, 9),
            "escalations": max(0, len(self.runs) - 1),
            **self.details,
        }


@dataclass
class Outcome:
    """Where a request's routing ended: a finished completion, or the expert to stream from
    (its run is added to the record when the stream ends)."""

    record: RoutingRecord
    completion: Completion | None = None
    stream_from: str | None = None
    alternatives: tuple[str, ...] = ()  # who streams if `stream_from` fails (the gate's next)
