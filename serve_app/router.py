"""The router ingress: speaks the OpenAI API and sends each request to the right expert(s).

It holds one `ExpertClient` per model id (Serve handles for local experts, the openai client for
remote ones) and never loads a model. The `model` field names an expert, `default`, an alias, or a
routing policy (`moe`, `cascade`, with options: `cascade:budget=0.02`, see naming.py);
`frugalserve.expert` / `frugalserve.policy` in the body override it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from frugalserve.cascade.artifact import ArtifactError
from frugalserve.experts.engine import Completion, GenerationRequest
from frugalserve.serve_app import naming
from frugalserve.serve_app.auth import load_keys
from frugalserve.serve_app.clients import ExpertClient, HandleClient
from frugalserve.serve_app.config import AppConfig
from frugalserve.serve_app.deadline import RequestBudget
from frugalserve.serve_app.errors import APIError, install_error_handlers
from frugalserve.serve_app.failover import Failover
from frugalserve.serve_app.metrics import StreamTimer, application_metrics, record_outcome
from frugalserve.serve_app.middleware import RouterMiddleware
from frugalserve.serve_app.models import model_entries
from frugalserve.serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RoutingOptions,
    UnsupportedParameter,
    now,
)
from frugalserve.serve_app.record import Outcome, Prices, RoutingRecord
from frugalserve.serve_app.remote import RemoteClient
from frugalserve.serve_app.routing.log import FeedbackRequest
from frugalserve.serve_app.routing.policies import Policies
from frugalserve.serve_app.routing.swap import Swapper, SwapRequest
from frugalserve.serve_app.sessions import SESSION_HEADER
from frugalserve.serve_app.streaming import ResponseBuilder, held_events, live_events
from ray import serve

from frugalserve import __version__

Body = ChatCompletionRequest | CompletionRequest
Kind = Literal["expert", "policy"]
T = TypeVar("T")


def make_clients(config: AppConfig, handles: dict[str, Any]) -> dict[str, ExpertClient]:
    """One client per model id: local experts and their LoRA adapters through their deployment's
    handle, remote experts over HTTP."""
    clients: dict[str, ExpertClient] = {}
    for expert in config.experts:
        if expert.is_remote:
            clients[expert.name] = RemoteClient(expert, config.router.request_timeout_s)
            continue
        timeout = expert.deployment.timeout_s
        clients[expert.name] = HandleClient(expert.name, handles[expert.name], timeout)
        for adapter in expert.adapters:
            clients[adapter] = HandleClient(adapter, handles[expert.name], timeout, adapter=adapter)
    return clients


@serve.ingress()
class Router:
    def __init__(self, config: dict, experts: dict):
        self.config = AppConfig.model_validate(config)
        router = self.config.router
        self.api_keys = load_keys(router.api_keys_env, router.api_keys_file)
        self.clients = make_clients(self.config, experts)
        self.failover = Failover(self.clients, self.config)
        self.names = self.config.model_ids()
        art = self.config.artifact  # loaded once, by the validation above
        self.policies = None if art is None else Policies(self.config.routing, art, self.clients,
                                                          self.failover)
        self.swapper = Swapper(self.config.routing.artifact)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The HTTP API, built in the replica so that its middleware holds this router's keys."""
        app = FastAPI(title="frugalserve", version=__version__, description="OpenAI-compatible "
                      "router that answers with the cheapest good-enough expert.")
        install_error_handlers(app)
        app.add_middleware(RouterMiddleware, api_keys=self.api_keys)
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/health", self.healthz, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/router", self.router_status, methods=["GET"])
        app.add_api_route("/v1/router", self.swap_router, methods=["POST"])
        app.add_api_route("/v1/feedback", self.feedback, methods=["POST"])
        return app

    async def feedback(self, body: FeedbackRequest) -> dict:
        """A client's score of a routed answer, into the routing log (`routing.log_path`)."""
        log = self.policies.log if self.policies is not None else None
        if log is None:
            raise APIError(400, "feedback needs the routing log (routing.log_path)",
                           param="id", code="routing_log_disabled")
        if not log.knows(body.id):
            raise APIError(404, f"no routed completion {body.id!r} on this router (ids of "
                           "moe and cascade answers are remembered)", param="id",
                           code="completion_not_found")
        log.feedback(body.id, body.value())
        return {"id": body.id, "score": body.value(), "recorded": True}

    # -- swapping the router artifact (serve_app/routing/swap.py) ---------------------------

    def _swap(self, path: str) -> None:
        self.policies = self.swapper.swap(path, self.config.routing, self.clients,
                                          [e.name for e in self.config.experts], self.policies,
                                          self.failover)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's `user_config` of the router deployment: `{"artifact": PATH}` swaps the artifact
        in place; a refused one is logged and counted, and the old one keeps serving."""
        path = (user_config or {}).get("artifact")
        if path and path != self.swapper.path:
            with contextlib.suppress(ArtifactError):
                self._swap(path)

    async def router_status(self) -> dict:
        return self.swapper.status(self.policies)

    async def swap_router(self, body: SwapRequest) -> dict:
        try:
            await asyncio.to_thread(self._swap, body.artifact)
        except ArtifactError as exc:
            raise APIError(400, str(exc), param="artifact", code="invalid_artifact") from None
        return self.swapper.status(self.policies)

    # -- routing --------------------------------------------------------------------------

    def _route(self, body: Body) -> tuple[Kind, str, RoutingOptions | None]:
        """("expert", name, options) or ("policy", name, options): the body's `frugalserve`
        options over those the model name (or its alias) carries."""
        options = body.frugalserve
        if options is not None and options.expert is not None:
            return "expert", self._known_expert(options.expert, "frugalserve.expert"), options
        name, param = self.config.aliases.get(body.model, body.model), "model"
        if options is not None and options.policy is not None:
            name, param = options.policy, "frugalserve.policy"
        try:
            name, named = naming.parse(name)
        except naming.ModelNameError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        if named:
            given = options.model_dump(exclude_none=True) if options is not None else {}
            options = RoutingOptions(**{**named, **given})
        if name == "default":
            name = self.config.default_model or self.names[0]
        if named and name in self.names:
            raise APIError(400, f"model {body.model!r}: routing options need a policy, not the "
                           f"expert {name!r}", param=param, code="invalid_value")
        if name in self.names:
            return "expert", name, options
        if self.policies is not None and name in self.policies.names:
            return "policy", name, options
        if name in Policies.names or param == "frugalserve.policy":
            raise APIError(
                400 if param == "frugalserve.policy" else 404,
                f"routing policy {name!r} is not available: this application has "
                + ("policies " + str(list(self.policies.names)) if self.policies else
                   "no router artifact configured (routing.artifact)"),
                param=param, code="unknown_policy" if param != "model" else "model_not_found")
        return "expert", self._known_expert(name, param), options

    def _known_expert(self, name: str, param: str) -> str:
        if name in self.names:
            return name
        available = self.names + (list(self.policies.names) if self.policies else []) + list(
            self.config.aliases)
        raise APIError(404, f"The model {name!r} does not exist; available: {available}",
                       param=param, code="model_not_found")

    async def _outcome(self, kind: Kind, name: str, request: GenerationRequest, body: Body,
                       options: RoutingOptions | None, header: str | None,
                       budget: RequestBudget) -> Outcome:
        if kind == "policy" and self.policies is not None:
            return await self.policies.run(name, request, options, header, body.stream, budget)
        rec = RoutingRecord(policy="direct")
        if body.stream:
            return Outcome(rec, stream_from=name)
        expert, c = await self.failover.generate(self.failover.chain(name), request, budget)
        rec.add(expert, c, Prices.of(await self.clients[expert].info()))
        return Outcome(rec, completion=c)

    async def _within(self, budget: RequestBudget, call: Awaitable[T]) -> T:
        """`call`, given up with a 504 `deadline_exceeded` when the request's time is up."""
        try:
            return await asyncio.wait_for(call, max(0.0, budget.remaining()))
        except asyncio.TimeoutError:
            raise budget.expired() from None

    def _finish(self, kind: Kind, request: GenerationRequest, header: str | None,
                rec: RoutingRecord, c: Completion) -> None:
        """The answer is complete: a policy remembers the conversation's expert; metrics count
        its tokens and cost."""
        if kind == "policy" and self.policies is not None and rec.answered_by:
            self.policies.remember(request, header, rec.answered_by, c.text)
            self.policies.record(request, rec, c)
        record_outcome(rec.as_dict(), tuple(x.finish_reason for x in c.choices))

    # -- endpoints --------------------------------------------------------------------------

    async def healthz(self) -> dict:
        return {"status": "ok", "experts": self.names, "version": __version__,
                "policies": list(self.policies.names) if self.policies else []}

    async def models(self) -> dict:
        return {"object": "list", "data": await model_entries(self)}

    async def model(self, model_id: str) -> dict:
        for entry in await model_entries(self):
            if entry["id"] == model_id:
                return entry
        self._known_expert(model_id, "model")  # raises the 404 that lists what exists
        raise AssertionError("unreachable")

    async def metrics(self) -> PlainTextResponse:
        """The application's Prometheus series from every node's Ray metrics agent, vLLM's names
        as vLLM's own server writes them (so `curl HOST:8000/metrics` reads as with vLLM)."""
        return PlainTextResponse(await application_metrics(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        route = self._route(body)
        try:
            messages = body.plain_messages()
        except UnsupportedParameter as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        request = GenerationRequest(
            messages=messages, params=body.sampling(), tools=tuple(body.tools or ()) or None,
            tool_choice=body.tool_choice, request_id=f"chatcmpl-{raw.state.request_id}")
        return await self._respond(route, request, body, raw, chat=True)

    async def completions(self, body: CompletionRequest, raw: Request):
        route = self._route(body)
        request = GenerationRequest(prompt=body.prompt_text(), params=body.sampling(),
                                    request_id=f"cmpl-{raw.state.request_id}")
        return await self._respond(route, request, body, raw, chat=False)

    async def _respond(self, route: tuple[Kind, str, RoutingOptions | None],
                       request: GenerationRequest, body: Body, raw: Request, chat: bool):
        kind, name, options = route
        header = raw.headers.get(SESSION_HEADER)
        policy = name if kind == "policy" else "direct"
        raw.state.model, raw.state.policy, raw.state.streaming = name, policy, bool(body.stream)
        timer = StreamTimer(getattr(raw.state, "started", time.perf_counter()), name, policy)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        b = ResponseBuilder(request.request_id, now(), chat=chat, logprobs=bool(body.logprobs),
                            include_usage=usage)
        budget = RequestBudget(self.config.router.request_timeout_s, self.config.router.max_retries)
        outcome = await self._within(budget, self._outcome(kind, name, request, body, options,
                                                           header, budget))

        def finish(rec: RoutingRecord, c: Completion) -> None:
            self._finish(kind, request, header, rec, c)

        if outcome.stream_from is not None:
            # the first delta is in when this returns: until then, errors are still 4xx/5xx and
            # a failed attempt is retried
            candidates = self.failover.chain(outcome.stream_from, *outcome.alternatives)
            stream = await self._within(budget, self.failover.stream(candidates, request, budget))
            outcome.record.note_retries(budget.retries)
            timer.expert = stream.expert
            prices = Prices.of(await self.clients[stream.expert].info())
            events = live_events(b, stream, outcome.record, prices, timer, finish, body.n)
            # who answers is known; the cost is not until the stream ends (its last chunk has it)
            headers = routing_headers(outcome.record, stream.expert, cost=False)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        assert outcome.completion is not None
        outcome.record.note_retries(budget.retries)
        timer.expert = outcome.record.answered_by
        finish(outcome.record, outcome.completion)
        headers = routing_headers(outcome.record, outcome.record.answered_by)
        if body.stream:  # held until accepted (cascade, top-k): sent as one piece
            events = held_events(b, outcome.completion, outcome.record, timer)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(b.body(outcome.completion, outcome.record), headers=headers)


def routing_headers(rec: RoutingRecord, expert: str, cost: bool = True) -> dict[str, str]:
    """The routing result for proxies that drop unknown body fields."""
    headers = {"x-frugalserve-expert": expert,
               "x-frugalserve-escalations": str(len(rec.runs) if not cost else max(0, len(rec.runs) - 1))}
    if cost:
        headers["x-frugalserve-cost"] = f"{rec.cost:.9g}"
    return headers
