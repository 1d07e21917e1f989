"""A circuit breaker for one remote expert: after `allowed_fails` failed calls in a row it opens,
and for `cooldown_s` (at least the endpoint's `Retry-After`) calls are refused at once, so a
request goes to its fallback instead of waiting on an endpoint that is down. Then one trial call
is let through (half open): its success closes the breaker, its failure opens it again.

Per router replica; the clock is injected so that a test can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}  # the metric's values


class CircuitBreaker:
    def __init__(self, allowed_fails: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.allowed_fails, self.cooldown_s, self.clock = allowed_fails, cooldown_s, clock
        self.failures = 0  # in a row
        self.opened_until: float | None = None
        self.trial = False  # the half-open trial call is out

    @property
    def state(self) -> State:
        if self.opened_until is None:
            return "closed"
        return "open" if self.clock() < self.opened_until else "half_open"

    def retry_in_s(self) -> float:
        """Seconds until a call is let through again (0 when one would be now)."""
        if self.state != "open" or self.opened_until is None:
            return 0.0
        return max(0.0, self.opened_until - self.clock())

    def allow(self) -> bool:
        """Whether a call may go out now; in the half-open state, the first caller takes the trial."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial:
            self.trial = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_until, self.trial = 0, None, False

    def failure(self, retry_after_s: float = 0.0) -> None:
        """A failed call; `retry_after_s`: the endpoint's `Retry-After`, honoured even before
        the breaker would open by count."""
        self.failures += 1
        now = self.clock()
        if self.trial or self.failures >= self.allowed_fails:
            until = now + max(self.cooldown_s, retry_after_s)
        elif retry_after_s > 0:
            until = now + retry_after_s
        else:
            return
        self.opened_until, self.trial = max(until, self.opened_until or until), False

    def as_dict(self) -> dict:
        return {"state": self.state, "failures": self.failures,
                "retry_in_s": round(self.retry_in_s(), 3)}
