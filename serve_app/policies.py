"""The `moe` and `cascade` routing policies, as the router runs them per request.

Decisions come from `frugalserve.cascade` (gate, scorer, `cascade_step`); this module only wires
them to expert calls, budgets, stickiness and the routing record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.cascade.features import ANSWER_FEATURES, answer_features
from frugalserve.cascade.policy import cascade_step
from frugalserve.experts.embedding import make_featurizer, prompt_text
from frugalserve.experts.engine import Completion, GenerationRequest
from frugalserve.experts.spec import resolve_model_path
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.responses import ExpertRun, RoutingRecord
from frugalserve.serve_app.sessions import SessionStore, lookup_key, store_key

logger = logging.getLogger("ray.serve")

RunExpert = Callable[[str, GenerationRequest], Awaitable[Completion]]
CostOf = Callable[[str, int, int], Awaitable[float]]


@dataclass
class Outcome:
    """A policy's result: a finished completion, or (streaming) the expert to stream from."""

    record: RoutingRecord
    completion: Completion | None = None
    stream_from: str | None = None


class Policies:
    def __init__(self, config, run: RunExpert, cost_of: CostOf):
        self.cfg = config.routing
        self.art = RouterArtifact.load(resolve_model_path(self.cfg.artifact))
        if self.cfg.gate_floor is not None:
            self.art.gate.floor = self.cfg.gate_floor
        if self.cfg.gate_default is not None:
            self.art.gate.default = self.cfg.gate_default
        self.featurize = make_featurizer(self.art.featurizer)
        self.sessions = SessionStore(self.cfg.session_ttl_s, self.cfg.max_sessions)
        self.run, self.cost_of = run, cost_of
        first = next(iter(self.art.scorer.models.values()))
        self.scorer_dims = first.mean.shape[0] - len(ANSWER_FEATURES)

    names = ("moe", "cascade")

    async def features(self, request: GenerationRequest) -> tuple[str, np.ndarray]:
        text = prompt_text(request.messages, request.prompt)
        return text, (await asyncio.to_thread(self.featurize, [text]))[0]

    def score(self, expert: str, text: str, feats: np.ndarray, c: Completion) -> float:
        af = answer_features(text, c.text, c.token_logprobs)
        return float(self.art.scorer.score(expert, af, self.art.projector(feats,
                                                                          self.scorer_dims))[0])

    def remember(self, request: GenerationRequest, header: str | None, outcome_expert: str,
                 answer: str) -> None:
        if self.cfg.sticky:
            self.sessions.put(store_key(request.messages, answer, header), outcome_expert)

    def _sticky_expert(self, request, header, options) -> str | None:
        if not self.cfg.sticky or (options is not None and options.sticky is False):
            return None
        return self.sessions.get(lookup_key(request.messages, header))

    # -- MoE ----------------------------------------------------------------------------------

    async def moe(self, request: GenerationRequest, options, header: str | None,
                  stream: bool) -> Outcome:
        text, feats = await self.features(request)
        probs = self.art.gate.probabilities(feats)[0]
        rec = RoutingRecord(policy="moe", details={
            "gate": {e: round(float(p), 4) for e, p in zip(self.art.gate.experts, probs)}})
        sticky = self._sticky_expert(request, header, options)
        if sticky is not None and sticky in self.art.gate.experts:
            chosen, reason = (sticky,), "session"
        else:
            d = self.art.gate.choose(feats, k=self.cfg.gate_k)
            chosen, reason = d.experts, ("fallback: " if d.fallback else "") + d.reason
        rec.details["gate_choice"] = list(chosen)
        rec.details["gate_reason"] = reason
        if len(chosen) == 1:
            if stream:
                return Outcome(rec, stream_from=chosen[0])
            c = await self.run(chosen[0], request)
            await self._record(rec, chosen[0], c)
            rec.answered_by = chosen[0]
            return Outcome(rec, completion=c)
        done = await asyncio.gather(*(self.run(e, request) for e in chosen))
        best, best_score = None, -1.0
        for e, c in zip(chosen, done):
            s = self.score(e, text, feats, c)
            await self._record(rec, e, c, score=round(s, 4))
            if s > best_score:
                best, best_score = (e, c), s
        rec.answered_by = best[0]
        return Outcome(rec, completion=best[1])

    # -- cascade --------------------------------------------------------------------------------

    async def cascade(self, request: GenerationRequest, options, header: str | None,
                      stream: bool) -> Outcome:
        budget = options.budget if options is not None else None
        max_tier = options.max_tier if options is not None else None
        try:
            point = self.art.operating_point(budget)
        except ArtifactError as exc:
            raise APIError(400, str(exc), param="frugalserve.budget", code="budget_too_low") from None
        order, ths = list(point.order), list(point.thresholds)
        if max_tier is not None and max_tier >= len(order):
            raise APIError(400, f"max_tier {max_tier} is out of range: the cascade has "
                           f"{len(order)} tiers ({order})", param="frugalserve.max_tier")
        text, feats = await self.features(request)
        start = 0
        sticky = self._sticky_expert(request, header, options)
        if sticky in order:
            start = order.index(sticky)
            if max_tier is not None:
                start = min(start, max_tier)
        rec = RoutingRecord(policy="cascade", details={
            "tiers": order, "thresholds": [round(t, 6) for t in ths], "start_tier": start,
            "budget": budget})
        spent, last_answer = 0.0, None
        for i in range(start, len(order)):
            expert = order[i]
            final = i == len(order) - 1 or (max_tier is not None and i >= max_tier)
            if final and stream:
                rec.details["stop_reason"] = "last_tier" if i == len(order) - 1 else "max_tier"
                return Outcome(rec, stream_from=expert)
            try:
                c = await self.run(expert, request)
            except APIError as exc:
                if exc.status < 500 or (last_answer is None and final):
                    raise
                if last_answer is not None:  # documented fallback: keep the answer we have
                    rec.details["stop_reason"] = f"{expert} unavailable"
                    return Outcome(rec, completion=last_answer[1])
                rec.details.setdefault("skipped", []).append(expert)
                continue
            cost = await self.cost_of(expert, c.prompt_tokens, c.completion_tokens)
            spent += cost
            score = self.score(expert, text, feats, c)
            th = ths[i] if i < len(ths) else 0.0
            next_cost = 0.0
            if not final:
                next_cost = await self.cost_of(order[i + 1], c.prompt_tokens, c.completion_tokens)
            step = cascade_step(i, len(order), score, th, spent=spent, next_cost=next_cost,
                                budget=budget, max_tier=max_tier)
            rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens, cost, {
                "score": round(score, 4), "threshold": round(th, 6), "accepted": step.accept}))
            rec.answered_by, last_answer = expert, (expert, c)
            if step.accept:
                rec.details["stop_reason"] = step.reason
                return Outcome(rec, completion=c)
        raise APIError(503, "no cascade tier could answer", type="server_error",
                       code="expert_unavailable")

    async def _record(self, rec: RoutingRecord, expert: str, c: Completion, **extra) -> None:
        cost = await self.cost_of(expert, c.prompt_tokens, c.completion_tokens)
        rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens, cost, extra))
