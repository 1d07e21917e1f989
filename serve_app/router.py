"""The router ingress: speaks the OpenAI API and sends each request to the right expert(s).

It holds one `ExpertClient` per model id (Serve handles for local experts, HTTP for remote ones)
and never loads a model. The `model` field names an expert, `default`, or a routing policy (`moe`,
`cascade`); `frugalserve.expert` / `frugalserve.policy` in the body override it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from frugalserve.experts.engine import Completion, GenerationRequest, SamplingParams
from frugalserve.serve_app.auth import load_keys
from frugalserve.serve_app.clients import ExpertClient, HandleClient
from frugalserve.serve_app.config import AppConfig
from frugalserve.serve_app.errors import APIError, install_error_handlers
from frugalserve.serve_app.metrics import StreamTimer, record_outcome
from frugalserve.serve_app.middleware import RouterMiddleware
from frugalserve.serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    UnsupportedParameter,
    new_id,
    now,
)
from frugalserve.serve_app.record import Outcome, Prices, RoutingRecord
from frugalserve.serve_app.remote import RemoteClient
from frugalserve.serve_app.routing.policies import Policies
from frugalserve.serve_app.sessions import SESSION_HEADER
from frugalserve.serve_app.streaming import ResponseBuilder, held_events, live_events
from ray import serve

from frugalserve import __version__

Body = ChatCompletionRequest | CompletionRequest
Kind = Literal["expert", "policy"]


def make_clients(config: AppConfig, handles: dict[str, Any]) -> dict[str, ExpertClient]:
    """One client per model id: local experts and their LoRA adapters through their deployment's
    handle, remote experts over HTTP."""
    timeout = config.router.request_timeout_s
    clients: dict[str, ExpertClient] = {}
    for expert in config.experts:
        if expert.is_remote:
            clients[expert.name] = RemoteClient(expert, timeout)
            continue
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
        self.names = self.config.model_ids()
        art = self.config.artifact  # loaded once, by the validation above
        self.policies = None if art is None else Policies(self.config.routing, art, self.clients)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The HTTP API, built in the replica so that its middleware holds this router's keys."""
        app = FastAPI(title="frugalserve", version=__version__, description="OpenAI-compatible "
                      "router that answers with the cheapest good-enough expert.")
        install_error_handlers(app)
        app.add_middleware(RouterMiddleware, api_keys=self.api_keys)
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        return app

    # -- routing --------------------------------------------------------------------------

    def _route(self, body: Body) -> tuple[Kind, str]:
        """("expert", name) or ("policy", name)."""
        options = body.frugalserve
        if options is not None and options.expert is not None:
            return "expert", self._known_expert(options.expert, "frugalserve.expert")
        name, param = body.model, "model"
        if options is not None and options.policy is not None:
            name, param = options.policy, "frugalserve.policy"
        if name == "default":
            name = self.config.default_model or self.names[0]
        if name in self.names:
            return "expert", name
        if self.policies is not None and name in self.policies.names:
            return "policy", name
        if name in Policies.names or param == "frugalserve.policy":
            raise APIError(
                400 if param == "frugalserve.policy" else 404,
                f"routing policy {name!r} is not available: this application has "
                + ("policies " + str(list(self.policies.names)) if self.policies else
                   "no router artifact configured (routing.artifact)"),
                param=param, code="unknown_policy" if param != "model" else "model_not_found")
        return "expert", self._known_expert(name, param)

    def _known_expert(self, name: str, param: str) -> str:
        if name in self.names:
            return name
        available = self.names + (list(self.policies.names) if self.policies else [])
        raise APIError(404, f"The model {name!r} does not exist; available: {available}",
                       param=param, code="model_not_found")

    async def _outcome(self, kind: Kind, name: str, request: GenerationRequest, body: Body,
                       header: str | None) -> Outcome:
        if kind == "policy" and self.policies is not None:
            return await self.policies.run(name, request, body.frugalserve, header, body.stream)
        rec = RoutingRecord(policy="direct")
        if body.stream:
            return Outcome(rec, stream_from=name)
        client = self.clients[name]
        c = await client.generate(request)
        rec.add(name, c, Prices.of(await client.info()))
        return Outcome(rec, completion=c)

    def _finish(self, kind: Kind, request: GenerationRequest, header: str | None,
                rec: RoutingRecord, c: Completion) -> None:
        """The answer is complete: a policy remembers the conversation's expert; metrics count
        its tokens and cost."""
        if kind == "policy" and self.policies is not None and rec.answered_by:
            self.policies.remember(request, header, rec.answered_by, c.text)
        record_outcome(rec.as_dict())

    # -- endpoints --------------------------------------------------------------------------

    async def healthz(self) -> dict:
        return {"status": "ok", "experts": self.names, "version": __version__,
                "policies": list(self.policies.names) if self.policies else []}

    async def models(self) -> dict:
        data = []
        for name in self.names:
            info = await self.clients[name].info()
            data.append({
                "id": name, "object": "model", "created": 0, "owned_by": "frugalserve",
                "max_model_len": info["max_context"],
                "frugalserve": {
                    "kind": "expert", "num_parameters": info["num_parameters"],
                    "cost_per_1k_prompt": info["cost_per_1k_prompt"],
                    "cost_per_1k_completion": info["cost_per_1k_completion"],
                    "engine": info["engine"], "batching": info["batching"],
                    "attention": info["attention"],
                    **({"adapter_of": info["adapter_of"]} if "adapter_of" in info else {}),
                },
            })
        if self.policies is not None:
            art = self.policies.art
            for name in self.policies.names:
                detail = ({"tiers": list(art.cascade.order), "expected_cost": art.cascade.cost,
                           "calibrated_accuracy": art.cascade.accuracy}
                          if name == "cascade" else {"experts": art.gate.experts})
                data.append({"id": name, "object": "model", "created": 0,
                             "owned_by": "frugalserve",
                             "frugalserve": {"kind": "policy", **detail}})
        return {"object": "list", "data": data}

    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        kind, name = self._route(body)
        try:
            messages = body.plain_messages()
        except UnsupportedParameter as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        request = GenerationRequest(messages=messages, params=self._params(body),
                                    request_id=new_id("chatcmpl"))
        return await self._respond(kind, name, request, body, raw, chat=True)

    async def completions(self, body: CompletionRequest, raw: Request):
        kind, name = self._route(body)
        request = GenerationRequest(prompt=body.prompt_text(), params=self._params(body),
                                    request_id=new_id("cmpl"))
        return await self._respond(kind, name, request, body, raw, chat=False)

    @staticmethod
    def _params(body: Body) -> SamplingParams:
        return SamplingParams(max_tokens=body.wanted_tokens(), temperature=body.temperature,
                              top_p=body.top_p, stop=body.stops(), seed=body.seed,
                              ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)

    async def _respond(self, kind: Kind, name: str, request: GenerationRequest, body: Body,
                       raw: Request, chat: bool):
        header = raw.headers.get(SESSION_HEADER)
        policy = name if kind == "policy" else "direct"
        raw.state.model, raw.state.policy, raw.state.streaming = name, policy, bool(body.stream)
        timer = StreamTimer(getattr(raw.state, "started", time.perf_counter()), name, policy)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        b = ResponseBuilder(request.request_id, now(), chat=chat, logprobs=bool(body.logprobs),
                            include_usage=usage)
        outcome = await self._outcome(kind, name, request, body, header)

        def finish(rec: RoutingRecord, c: Completion) -> None:
            self._finish(kind, request, header, rec, c)

        if outcome.stream_from is not None:
            client = self.clients[outcome.stream_from]
            prices = Prices.of(await client.info())
            stream = await client.stream(request)  # the first delta is here: errors are still 4xx/5xx
            events = live_events(b, stream, outcome.record, prices, timer, finish)
            return StreamingResponse(events, media_type="text/event-stream")
        assert outcome.completion is not None
        finish(outcome.record, outcome.completion)
        if body.stream:  # held until accepted (cascade, top-k): sent as one piece
            events = held_events(b, outcome.completion, outcome.record, timer)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(b.body(outcome.completion, outcome.record))
