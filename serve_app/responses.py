"""Turn engine completions into OpenAI response bodies and SSE chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from frugalserve.experts.engine import Completion


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

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.runs)

    def usage(self, final: Completion) -> dict[str, int]:
        # Usage counts every token the request made the experts process, not only the answer's.
        prompt = sum(r.prompt_tokens for r in self.runs) or final.prompt_tokens
        completion = sum(r.completion_tokens for r in self.runs) or final.completion_tokens
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


def chat_logprobs(c: Completion) -> dict[str, Any]:
    texts = c.token_texts or tuple("" for _ in c.token_ids)
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": list(t.encode("utf-8")),
                "top_logprobs": [],
            }
            for t, lp in zip(texts, c.token_logprobs)
        ]
    }


def completion_logprobs(c: Completion) -> dict[str, Any]:
    texts = list(c.token_texts or ("" for _ in c.token_ids))
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": texts,
        "token_logprobs": list(c.token_logprobs),
        "top_logprobs": None,
        "text_offset": offsets,
    }


def chat_body(rid: str, created: int, c: Completion, rec: RoutingRecord, logprobs: bool) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": rec.answered_by,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": rec.usage(c),
        "frugalserve": rec.as_dict(),
    }


def text_body(rid: str, created: int, c: Completion, rec: RoutingRecord, logprobs: bool) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": rec.answered_by,
        "choices": [
            {
                "index": 0,
                "text": c.text,
                "logprobs": completion_logprobs(c) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": rec.usage(c),
        "frugalserve": rec.as_dict(),
    }


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
