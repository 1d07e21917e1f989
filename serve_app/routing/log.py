"""The routing log (opt-in, `routing.log_path`): one JSON line per routed request, and the
feedback clients send about them (`POST /v1/feedback`), for `frugalserve calibrate --from-logs`.

A request line: `{"type": "request", "id", "time", "policy", "prompt_hash", "features",
"runs": [{"expert", "score", "threshold", "accepted", "cost", "prompt_tokens",
"completion_tokens", "logprob_mean", "logprob_min", "logprob_first", "token_logprobs"}],
"answered_by", "cost", "latency_s", "plan", "familiarity"}`, plus `"text"` (the prompt the router
read) and each run's `"answer"` only with `routing.log_text: true`. A feedback line:
`{"type": "feedback", "id", "time", "score"}` (thumbs up = 1, down = 0).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

REMEMBERED_IDS = 100_000  # completion ids a replica accepts feedback for (least recent go first)


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a completion's id and a score in [0, 1] or thumbs up / down."""

    id: str = Field(..., min_length=1, description="the `id` of a chat completion or completion")
    score: float | None = Field(None, ge=0, le=1, description="how good the answer was, 0 to 1")
    thumbs: Literal["up", "down"] | None = Field(None, description="or: up (1) / down (0)")

    @model_validator(mode="after")
    def _one(self) -> FeedbackRequest:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("send exactly one of `score` (0 to 1) and `thumbs` (up or down)")
        return self

    def value(self) -> float:
        return self.score if self.score is not None else float(self.thumbs == "up")


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RoutingLog:
    """Appends lines to `path` (thread-safe) and remembers the ids it logged for feedback."""

    def __init__(self, path: str | Path, *, text: bool = False):
        self.path, self.text = Path(path), text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, None] = OrderedDict()

    def _write(self, line: dict) -> None:
        data = json.dumps(line, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a") as f:
            f.write(data)

    def request(self, request_id: str, policy: str, text: str, features, record: dict,
                answers: dict[str, tuple[str, tuple[float, ...]]], latency_s: float) -> None:
        runs = []
        for run in record.get("runs", []):
            r = {k: run.get(k) for k in ("expert", "score", "threshold", "accepted", "cost",
                                          "prompt_tokens", "completion_tokens")}
            answer, raw = answers.get(run["expert"], ("", ()))
            lps = [round(float(x), 5) for x in raw]
            r.update(logprob_mean=sum(lps) / len(lps) if lps else None,
                     logprob_min=min(lps) if lps else None,
                     logprob_first=lps[0] if lps else None, token_logprobs=lps)
            if self.text:
                r["answer"] = answer
            runs.append(r)
        line = {"type": "request", "id": request_id, "time": time.time(), "policy": policy,
                "prompt_hash": prompt_hash(text),
                "features": [round(float(x), 5) for x in features],
                "runs": runs, "answered_by": record.get("answered_by"),
                "cost": record.get("cost"), "latency_s": round(latency_s, 6),
                "plan": record.get("plan"), "familiarity": record.get("familiarity")}
        if self.text:
            line["text"] = text
        self._write(line)
        with self._lock:
            self._ids[request_id] = None
            while len(self._ids) > REMEMBERED_IDS:
                self._ids.popitem(last=False)

    def knows(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._ids

    def feedback(self, request_id: str, score: float) -> None:
        self._write({"type": "feedback", "id": request_id, "time": time.time(), "score": score})


def read_log(path: str | Path) -> tuple[dict[str, dict], dict[str, float]]:
    """(request lines by id, the latest feedback score by id) of a routing log."""
    requests, feedback = {}, {}
    for line in Path(path).read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if d.get("type") == "request":
            requests[d["id"]] = d
        elif d.get("type") == "feedback":
            feedback[d["id"]] = float(d["score"])
    return requests, feedback
