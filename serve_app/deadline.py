"""One request's deadline and retries (`router.request_timeout_s`, `router.max_retries`), and
what the retries were spent on: the routing record's `retries`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from frugalserve.serve_app.errors import APIError


class RequestBudget:
    def __init__(self, timeout_s: float, max_retries: int,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.started = clock()
        self.deadline = self.started + timeout_s
        self.retries_left = max_retries
        self.retries: list[dict[str, Any]] = []  # one per failed attempt that was retried

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def expired(self) -> APIError:
        return APIError(504, f"the request did not finish within its deadline "
                        f"(router.request_timeout_s = {self.timeout_s:g} s)", type="timeout",
                        code="deadline_exceeded")

    def attempt_timeout(self, expert_timeout_s: float | None) -> float:
        """How long the next attempt may take: the time left, or the expert's own timeout if
        shorter; raises the 504 when no time is left."""
        left = self.remaining()
        if left <= 0:
            raise self.expired()
        return left if expert_timeout_s is None else min(left, expert_timeout_s)

    def note(self, expert: str, error: APIError) -> None:
        self.retries.append({"expert": expert, "status": error.status, "code": error.code,
                             "after_s": round(self.clock() - self.started, 3)})
