"""Failover: a request whose expert fails before it has sent anything is tried again.

Generation has no side effects, so an attempt that failed before the client saw a byte can be
repeated: first on the same local expert (Serve's handle has dropped the dead replica, so the
retry lands on another one, or waits for the replacement), then on the candidates that follow it
(the expert's `fallbacks`, the MoE gate's second choice), at most `router.max_retries` more
attempts and never past the request's deadline. A remote expert is not retried in place: its
client already retried (`remote.max_retries`) and its circuit breaker decides when it is called
again. What is not retried: a 4xx (the request itself is wrong), and anything once a stream has
sent its first token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from frugalserve.experts.engine import Completion, GenerationRequest
from frugalserve.serve_app.clients import ExpertClient, ExpertStream
from frugalserve.serve_app.config import AppConfig
from frugalserve.serve_app.deadline import RequestBudget
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.metrics import router_metrics

RETRY_SAME = frozenset({"expert_unavailable", "expert_timeout"})  # another replica may answer
RETRY_NEXT = RETRY_SAME | {"overloaded", "rate_limit_exceeded"}  # another expert may answer

T = TypeVar("T")


class Failover:
    def __init__(self, clients: Mapping[str, ExpertClient], config: AppConfig):
        self.clients = clients
        self.fallbacks = {e.name: tuple(e.fallbacks) for e in config.experts}
        self.local = {n for e in config.experts if not e.is_remote
                      for n in (e.name, *e.adapters)}

    def chain(self, expert: str, *more: str) -> list[str]:
        """`expert`, its configured fallbacks, then `more` (the policy's next choices)."""
        out: list[str] = []
        for name in (expert, *self.fallbacks.get(expert, ()), *more):
            if name not in out:
                out.append(name)
        return out

    async def generate(self, candidates: Sequence[str], request: GenerationRequest,
                       budget: RequestBudget) -> tuple[str, Completion]:
        """(the expert that answered, its completion)."""
        return await self._first(candidates, budget,
                                 lambda client, t: client.generate(request, timeout_s=t))

    async def stream(self, candidates: Sequence[str], request: GenerationRequest,
                     budget: RequestBudget) -> ExpertStream:
        """An opened stream (its first delta is in); later deltas keep to the deadline."""
        _, stream = await self._first(candidates, budget,
                                      lambda client, t: client.stream(request, timeout_s=t))
        stream.deadline = budget
        return stream

    async def _first(self, candidates: Sequence[str], budget: RequestBudget,
                     call: Callable[[ExpertClient, float], Awaitable[T]]) -> tuple[str, T]:
        m = router_metrics()
        failed: tuple[str, APIError] | None = None  # the last attempt's expert and error
        for i, expert in enumerate(candidates):
            last = i == len(candidates) - 1
            tries = 1 if expert not in self.local else (1 + budget.retries_left if last else 2)
            for _ in range(tries):
                if failed is not None:  # this attempt is a retry
                    if budget.retries_left <= 0:
                        raise failed[1]
                    budget.retries_left -= 1
                    budget.note(*failed)
                    m["retries"].inc(1, {"expert": failed[0], "code": str(failed[1].code)})
                client = self.clients[expert]
                try:
                    result = await call(client, budget.attempt_timeout(client.timeout_s))
                except APIError as exc:
                    if exc.status == 504 and budget.remaining() <= 0:
                        raise budget.expired() from None
                    if exc.code not in RETRY_NEXT:
                        raise
                    failed = expert, exc
                    if exc.code not in RETRY_SAME:
                        break  # its queue is full or it is rate-limited: the next one
                    continue
                if expert != candidates[0]:
                    m["fallbacks"].inc(1, {"expert": candidates[0], "fallback": expert})
                return expert, result
        assert failed is not None
        raise failed[1]
