"""The remote experts' circuit breaker and a request's deadline, on a clock the test drives."""

from __future__ import annotations

import pytest
from frugalserve.serve_app.breaker import CircuitBreaker
from frugalserve.serve_app.deadline import RequestBudget
from frugalserve.serve_app.errors import APIError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_the_allowed_fails_and_lets_one_trial_through():
    clock = Clock()
    b = CircuitBreaker(allowed_fails=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    assert b.as_dict() == {"state": "open", "failures": 3, "retry_in_s": 10.0}
    clock.now += 10
    assert b.state == "half_open"
    assert b.allow()  # the trial
    assert not b.allow()  # only one
    b.failure()  # the trial failed: open again for a whole cooldown
    assert b.state == "open" and b.retry_in_s() == 10
    clock.now += 10
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.failures == 0 and b.allow() and b.allow()


def test_a_success_resets_the_count():
    b = CircuitBreaker(allowed_fails=2, cooldown_s=5, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == "closed"


def test_retry_after_is_honoured_at_once_and_lengthens_the_cooldown():
    clock = Clock()
    b = CircuitBreaker(allowed_fails=3, cooldown_s=5, clock=clock)
    b.failure(retry_after_s=2)  # first failure, but the endpoint asked for 2 s
    assert b.state == "open" and b.retry_in_s() == 2
    clock.now += 2
    assert b.allow()
    b.failure()
    b.failure(retry_after_s=30)  # third: opens for max(cooldown, Retry-After)
    assert b.retry_in_s() == 30


def test_the_deadline_bounds_each_attempt_and_names_itself():
    clock = Clock()
    budget = RequestBudget(10, max_retries=2, clock=clock)
    assert budget.attempt_timeout(None) == 10
    assert budget.attempt_timeout(3) == 3
    clock.now += 8
    assert budget.attempt_timeout(3) == 2
    clock.now += 2
    with pytest.raises(APIError) as err:
        budget.attempt_timeout(None)
    assert (err.value.status, err.value.code) == (504, "deadline_exceeded")
    assert "router.request_timeout_s = 10 s" in err.value.message
