"""The `moe` and `cascade` routing policies, as the router runs them per request.

Decisions come from `frugalserve.cascade` (gate, scorer, `cascade_step`); this module only wires
them to expert calls, budgets, stickiness and the routing record.

Before any tier runs, the cascade plans where to start (`plan_cascade`): a prompt unlike the
calibration data goes straight to the fallback (default: the strongest tier), tiers the gate
predicts to fail are skipped, and when the expected climb costs more than the top tier alone the
top tier answers; the MoE gate sends unfamiliar prompts to the fallback too.

What the scorer cannot judge is never a reason to escalate: an answer that calls a tool is
accepted as it is (`stop_reason: tool_call`); a tier that cannot honour a field of the request
(tools, structured output, ... : a 400 `unsupported_parameter`) is skipped while a later tier
remains. An answer that is not valid under the requested `response_format` scores 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.cascade.features import answer_features
from frugalserve.cascade.policy import CascadePlan, cascade_step, plan_cascade
from frugalserve.experts.engine import Completion, GenerationRequest
from frugalserve.serve_app.clients import ExpertClient
from frugalserve.serve_app.config import RoutingConfig
from frugalserve.serve_app.deadline import RequestBudget
from frugalserve.serve_app.errors import APIError
from frugalserve.serve_app.failover import Failover
from frugalserve.serve_app.protocol import RoutingOptions
from frugalserve.serve_app.record import Outcome, Prices, RoutingRecord
from frugalserve.serve_app.routing.featurizers import make_featurizer, prompt_text
from frugalserve.serve_app.routing.log import RoutingLog
from frugalserve.serve_app.sessions import SessionStore, lookup_key, store_key


class Policies:
    names = ("moe", "cascade")

    def __init__(self, cfg: RoutingConfig, art: RouterArtifact,
                 clients: Mapping[str, ExpertClient], failover: Failover):
        gate = dataclasses.replace(
            art.gate,
            floor=art.gate.floor if cfg.gate_floor is None else cfg.gate_floor,
            default=art.gate.default if cfg.gate_default is None else cfg.gate_default)
        self.cfg, self.art, self.clients = cfg, dataclasses.replace(art, gate=gate), clients
        self.failover = failover
        self.featurize = make_featurizer(art.featurizer)
        self.fallback = cfg.fallback or (art.plan.fallback if art.plan else None)
        self.sessions = SessionStore(cfg.session_ttl_s, cfg.max_sessions)
        self.log = RoutingLog(cfg.log_path, text=cfg.log_text) if cfg.log_path else None
        self._pending: OrderedDict[str, dict] = OrderedDict()  # request id -> what the log needs

    def _note(self, request: GenerationRequest, **kw) -> None:
        if self.log is None:
            return
        entry = self._pending.setdefault(request.request_id, {"t0": time.perf_counter(),
                                                              "answers": {}})
        answers = kw.pop("answers", {})
        entry["answers"].update(answers)
        entry.update(kw)
        while len(self._pending) > 10_000:  # requests that failed never reach `record`
            self._pending.popitem(last=False)

    def record(self, request: GenerationRequest, rec: RoutingRecord, c: Completion) -> None:
        """The request is answered: its line in the routing log (when enabled)."""
        entry = self._pending.pop(request.request_id, None)
        if self.log is None or entry is None or "text" not in entry:
            return
        answers = dict(entry["answers"])
        if rec.answered_by:
            answers[rec.answered_by] = (c.text, tuple(c.token_logprobs))
        self.log.request(request.request_id, rec.policy, entry["text"], entry["feats"],
                         rec.as_dict(), answers, time.perf_counter() - entry["t0"])
    async def run(self, name: str, request: GenerationRequest, options: RoutingOptions | None,
                  header: str | None, stream: bool, deadline: RequestBudget) -> Outcome:
        self._note(request)
        policy = self.moe if name == "moe" else self.cascade
        return await policy(request, options, header, stream, deadline)

    async def features(self, request: GenerationRequest) -> tuple[str, np.ndarray]:
        text = prompt_text(request.messages, request.prompt)
        feats = (await asyncio.to_thread(self.featurize, [text]))[0]
        self._note(request, text=text, feats=feats)
        return text, feats

    def score(self, expert: str, text: str, feats: np.ndarray, c: Completion,
              request: GenerationRequest | None = None) -> float:
        """The scorer's P(correct) of an answer; with n > 1 choices, the weakest choice's; 0 for
        an answer that breaks the requested format."""
        if request is not None and not all(valid_format(request, x.text) for x in c.choices):
            return 0.0
        return min(float(self.art.score(expert, answer_features(text, x.text, x.token_logprobs),
                                        feats)[0]) for x in c.choices)

    def unfamiliar(self, text: str, feats: np.ndarray) -> tuple[bool, dict | None]:
        """(is the prompt unlike the calibration data, what the detector measured)."""
        fam = self.art.familiarity
        if not self.cfg.familiarity or fam is None or self.fallback is None:
            return False, None
        d, cov = float(fam.distance(feats)[0]), float(fam.coverage([text])[0])
        return bool(fam.unfamiliar([text], feats)[0]), {"distance": round(d, 4),
                                                         "phrasing_coverage": round(cov, 4)}

    def plan(self, order: list[str], feats: np.ndarray, unfamiliar: bool) -> CascadePlan:
        gate = self.art.gate
        cols = [gate.experts.index(e) for e in order]
        p = gate.probabilities(feats)[0][cols]
        skips = self.art.plan.skips_for(tuple(order)) if self.art.plan else ()
        fallback = order.index(self.fallback) if self.fallback in order else None
        return plan_cascade(p, gate.mean_cost[cols], skips, unfamiliar=unfamiliar,
                            fallback=fallback,
                            cost_guard=bool(self.art.plan and self.art.plan.cost_guard))

    async def prices(self, expert: str) -> Prices:
        return Prices.of(await self.clients[expert].info())

    def remember(self, request: GenerationRequest, header: str | None, expert: str,
                 answer: str) -> None:
        if self.cfg.sticky:
            self.sessions.put(store_key(request.messages, answer, header), expert)

    def _sticky_expert(self, request: GenerationRequest, header: str | None,
                       options: RoutingOptions | None) -> str | None:
        if not self.cfg.sticky or (options is not None and options.sticky is False):
            return None
        return self.sessions.get(lookup_key(request.messages, header))

    # -- MoE ----------------------------------------------------------------------------------

    async def moe(self, request: GenerationRequest, options: RoutingOptions | None,
                  header: str | None, stream: bool, deadline: RequestBudget) -> Outcome:
        gate = self.art.gate
        text, feats = await self.features(request)
        probs = gate.probabilities(feats)[0]
        rec = RoutingRecord(policy="moe", details={
            "gate": {e: round(float(p), 4) for e, p in zip(gate.experts, probs)}})
        sticky = self._sticky_expert(request, header, options)
        ranked = gate.choose(feats, k=len(gate.experts))  # best first: the rest are next choices
        chosen: tuple[str, ...]
        unfamiliar, familiarity = self.unfamiliar(text, feats)
        if familiarity is not None:
            rec.details["familiarity"] = dict(familiarity, unfamiliar=unfamiliar)
        if sticky is not None and sticky in gate.experts:
            chosen, reason = (sticky,), "session"
        elif unfamiliar and self.fallback is not None:
            chosen, reason = (self.fallback,), "unfamiliar prompt: fallback"
        else:
            chosen = ranked.experts[:self.cfg.gate_k]
            reason = ("fallback: " if ranked.fallback else "") + ranked.reason
        rec.details["gate_choice"] = list(chosen)
        rec.details["gate_reason"] = reason
        if len(chosen) == 1:
            nxt = tuple(e for e in ranked.experts if e not in chosen)[:1]  # the second choice
            if stream:
                return Outcome(rec, stream_from=chosen[0], alternatives=nxt)
            expert, c = await self.failover.generate(self.failover.chain(chosen[0], *nxt),
                                                     request, deadline)
            rec.add(expert, c, await self.prices(expert))
            return Outcome(rec, completion=c)
        tried = await asyncio.gather(*(self.failover.generate(self.failover.chain(e), request,
                                                              deadline) for e in chosen),
                                     return_exceptions=True)
        done = [t for t in tried if not isinstance(t, BaseException)]
        if not done:  # every chosen expert failed: the first one's error
            raise next(t for t in tried if isinstance(t, BaseException))
        scored = [(self.score(e, text, feats, c, request) if e in gate.experts else 0.0, e, c)
                  for e, c in done]
        for s, e, c in scored:
            rec.add(e, c, await self.prices(e), score=round(s, 4))
        _, rec.answered_by, best = max(scored, key=lambda t: t[0])
        return Outcome(rec, completion=best)

    # -- cascade --------------------------------------------------------------------------------

    async def cascade(self, request: GenerationRequest, options: RoutingOptions | None,
                      header: str | None, stream: bool, deadline: RequestBudget) -> Outcome:
        budget = options.budget if options is not None else None
        max_tier = options.max_tier if options is not None else None
        try:
            point = self.art.operating_point(budget)
        except ArtifactError as exc:
            raise APIError(400, str(exc), param="frugalserve.budget", code="budget_too_low") from None
        order, ths = list(point.order), list(point.thresholds)
        for field, value in (("max_tier", max_tier), ("start_tier", options.start_tier if options else None)):
            if value is not None and value >= len(order):
                raise APIError(400, f"{field} {value} is out of range: the cascade has "
                               f"{len(order)} tiers ({order})", param=f"frugalserve.{field}",
                               code="invalid_value")
        text, feats = await self.features(request)
        unfamiliar, familiarity = self.unfamiliar(text, feats)
        plan: CascadePlan | None = None
        if options is not None and options.start_tier is not None:
            start = options.start_tier  # the client's choice stands
        else:
            plan = self.plan(order, feats, unfamiliar)
            start = plan.start
            if plan.reason == "unfamiliar":  # the fallback answers, no climbing; a client's
                max_tier = start if max_tier is None else min(start, max_tier)  # cap still holds
        sticky = self._sticky_expert(request, header, options)
        if sticky in order:
            start = max(start, order.index(sticky))
        if max_tier is not None:
            start = min(start, max_tier)
        rec = RoutingRecord(policy="cascade", details={
            "tiers": order, "thresholds": [round(t, 6) for t in ths], "start_tier": start,
            "budget": budget})
        if plan is not None:
            rec.details["plan"] = {"start": plan.start, "reason": plan.reason,
                                   "expected_cost": round(plan.expected_cost, 6)}
        if familiarity is not None:
            rec.details["familiarity"] = dict(familiarity, unfamiliar=unfamiliar)
        if (unfamiliar and plan is not None and self.fallback is not None
                and self.fallback not in order):
            return await self._fallback(request, rec, stream)
        last_answer: Completion | None = None
        for i in range(start, len(order)):
            expert = order[i]
            final = i == len(order) - 1 or (max_tier is not None and i >= max_tier)
            if final and stream:
                rec.details["stop_reason"] = "last_tier" if i == len(order) - 1 else "max_tier"
                return Outcome(rec, stream_from=expert)
            try:  # a tier is retried in place; the last also falls back to its `fallbacks`
                candidates = self.failover.chain(expert) if final else [expert]
                answered, c = await self.failover.generate(candidates, request, deadline)
            except APIError as exc:
                if exc.code == "unsupported_parameter" and not final:
                    rec.details.setdefault("skipped", []).append(expert)  # a later tier may
                    continue
                if exc.status < 500 or (last_answer is None and final):
                    raise
                if last_answer is not None:  # documented fallback: keep the answer we have
                    rec.details["stop_reason"] = f"{expert} unavailable"
                    return Outcome(rec, completion=last_answer)
                rec.details.setdefault("skipped", []).append(expert)
                continue
            if any(x.tool_calls for x in c.choices):  # nothing to score: the call stands
                rec.add(answered, c, await self.prices(answered), accepted=True)
                rec.details["stop_reason"] = "tool_call"
                return Outcome(rec, completion=c)
            if answered != expert:  # the last tier's fallback: it answers, unscored
                rec.add(answered, c, await self.prices(answered), accepted=True)
                rec.details["stop_reason"] = f"fallback of {expert}"
                return Outcome(rec, completion=c)
            score = self.score(expert, text, feats, c, request)
            th = ths[i] if i < len(ths) else 0.0
            next_cost = 0.0
            if not final:
                next_cost = (await self.prices(order[i + 1])).cost(c.prompt_tokens,
                                                                   c.generated_tokens)
            self._note(request, answers={expert: (c.text, tuple(c.token_logprobs))})
            run = rec.add(expert, c, await self.prices(expert), score=round(score, 4),
                          threshold=round(th, 6))
            step = cascade_step(i, len(order), score, th, spent=rec.cost, next_cost=next_cost,
                                budget=budget, max_tier=max_tier)
            run.extra["accepted"], last_answer = step.accept, c
            if step.accept:
                rec.details["stop_reason"] = step.reason
                return Outcome(rec, completion=c)
        raise APIError(503, "no cascade tier could answer", type="server_error",
                       code="expert_unavailable")

    async def _fallback(self, request: GenerationRequest, rec: RoutingRecord,
                        stream: bool) -> Outcome:
        """An unfamiliar prompt, answered by a fallback expert outside the cascade's tiers."""
        assert self.fallback is not None
        rec.details["stop_reason"] = "unfamiliar"
        if stream:
            return Outcome(rec, stream_from=self.fallback)
        c = await self.clients[self.fallback].generate(request)
        rec.add(self.fallback, c, await self.prices(self.fallback), accepted=True)
        return Outcome(rec, completion=c)


def valid_format(request: GenerationRequest, text: str) -> bool:
    """Whether `text` is what the request's `response_format` asked for."""
    guide = request.params.guide
    if guide is None:
        return True
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if guide.kind == "json_schema" and guide.schema is not None:
        import jsonschema  # loaded on the first structured request only

        try:
            jsonschema.validate(value, json.loads(guide.schema))
        except jsonschema.ValidationError:
            return False
    return guide.kind == "json_schema" or isinstance(value, dict)
