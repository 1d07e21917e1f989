"""The router ingress: speaks the OpenAI API and sends each request to the right expert(s).

It holds DeploymentHandles to the local experts (and HTTP clients for remote ones) and never
loads a model. The `model` field names an expert, `default`, or a routing policy (`moe`,
`cascade`); `frugalserve.expert` / `frugalserve.policy` in the body override it.
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from frugalserve.experts.engine import Completion, GenerationRequest, SamplingParams
from frugalserve.serve_app.auth import load_keys
from frugalserve.serve_app.config import AppConfig
from frugalserve.serve_app.errors import APIError, install_error_handlers
from frugalserve.serve_app.metrics import record_outcome, router_metrics
from frugalserve.serve_app.middleware import RouterMiddleware
from frugalserve.serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    UnsupportedParameter,
    new_id,
    now,
)
from frugalserve.serve_app.responses import (
    ExpertRun,
    RoutingRecord,
    chat_body,
    chat_logprobs,
    completion_logprobs,
    sse,
    text_body,
)
from frugalserve.serve_app.sessions import SESSION_HEADER
from ray import serve

from frugalserve import __version__

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="frugalserve",
    version=__version__,
    description="OpenAI-compatible router that answers with the cheapest good-enough expert.",
)
install_error_handlers(app)
app.add_middleware(RouterMiddleware)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the original is its `cause`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _to_api_error(exc: BaseException, expert: str, prompt_param: str = "messages") -> APIError:
    from frugalserve.experts.engine import EngineError, PromptTooLongError
    from frugalserve.serve_app.remote import RemoteExpertError
    from ray.serve.exceptions import BackPressureError

    inner = _unwrap(exc)
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, BackPressureError):
        return APIError(503, f"expert {expert!r} is overloaded (its queue is full); retry later",
                        type="server_error", code="overloaded")
    if isinstance(inner, PromptTooLongError):
        return APIError(400, str(inner), param=prompt_param, code="context_length_exceeded")
    if isinstance(inner, RemoteExpertError):
        return APIError(503, str(inner), type="server_error", code="expert_unavailable")
    if isinstance(inner, EngineError):
        return APIError(400, f"expert {expert!r} rejected the request: {inner}")
    if isinstance(inner, (ValueError, UnsupportedParameter)):
        return APIError(400, f"expert {expert!r} rejected the request: {inner}")
    if isinstance(inner, asyncio.TimeoutError):
        return APIError(504, f"expert {expert!r} did not answer in time", type="timeout")
    return APIError(
        503, f"expert {expert!r} failed: {type(inner).__name__}: {inner}",
        type="server_error", code="expert_unavailable",
    )


class _Timing:
    """TTFT, inter-token latency and end-to-end latency of one streamed response."""

    def __init__(self, started: float, model: str, policy: str):
        self.started, self.model, self.policy, self.last = started, model, policy, None

    def token(self) -> None:
        now_ = time.perf_counter()
        m = router_metrics()
        if self.last is None:
            m["ttft"].observe(now_ - self.started, {"model": self.model})
        else:
            m["itl"].observe(now_ - self.last, {"model": self.model})
        self.last = now_

    def done(self) -> None:
        router_metrics()["e2e"].observe(time.perf_counter() - self.started,
                                        {"model": self.model, "policy": self.policy})


@serve.ingress(app)
class Router:
    def __init__(self, config: dict, experts: dict):
        from frugalserve.serve_app.remote import RemoteExpert

        self.config = AppConfig.model_validate(config)
        from frugalserve.serve_app import auth

        auth.ACTIVE_KEYS = load_keys(self.config.router.api_keys_env,
                                     self.config.router.api_keys_file)
        self.timeout_s = self.config.router.request_timeout_s
        self.experts = dict(experts)  # {name: DeploymentHandle} for local experts
        self.remote = {s.name: RemoteExpert(s, self.timeout_s)
                       for s in self.config.experts if s.kind == "openai"}
        self.names = self.config.model_ids()
        self.adapter_base = self.config.adapter_bases()  # adapter -> deployment that serves it
        self._info: dict[str, dict] = {n: r.info() for n, r in self.remote.items()}
        self.policies = None
        if self.config.routing.artifact is not None:
            from frugalserve.serve_app.policies import Policies

            self.policies = Policies(self.config, self._run_one, self._cost)

    # -- expert facts ---------------------------------------------------------------------

    async def _expert_info(self, name: str) -> dict:
        if name not in self._info:
            if name in self.adapter_base:
                base = await self._expert_info(self.adapter_base[name])
                self._info[name] = {**base, "name": name, "adapter_of": base["name"]}
            else:
                self._info[name] = await self.experts[name].info.remote()
        return self._info[name]

    def _target(self, expert: str, request: GenerationRequest):
        """The deployment handle that serves `expert`, and the request as it should see it."""
        base = self.adapter_base.get(expert)
        if base is None:
            return self.experts[expert], request
        return self.experts[base], dataclasses.replace(request, adapter=expert)

    async def _cost(self, expert: str, prompt_tokens: int, completion_tokens: int) -> float:
        info = await self._expert_info(expert)
        return (prompt_tokens * info["cost_per_1k_prompt"]
                + completion_tokens * info["cost_per_1k_completion"]) / 1000.0

    # -- routing --------------------------------------------------------------------------

    def _route(self, body) -> tuple[str, str]:
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
        if name in ("moe", "cascade") or param == "frugalserve.policy":
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
        raise APIError(
            404, f"The model {name!r} does not exist; available: {available}",
            param=param, code="model_not_found",
        )

    # -- calling experts ----------------------------------------------------------------------

    async def _run_one(self, expert: str, request: GenerationRequest) -> Completion:
        param = "messages" if request.messages is not None else "prompt"
        try:
            if expert in self.remote:
                call = self.remote[expert].generate(request)
            else:
                handle, request = self._target(expert, request)
                call = handle.generate.remote(request)
            return await asyncio.wait_for(call, self.timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an HTTP error
            raise _to_api_error(exc, expert, param) from None

    async def _outcome(self, kind: str, name: str, request, body, header, stream: bool):
        from frugalserve.serve_app.policies import Outcome

        if kind == "policy":
            run = self.policies.moe if name == "moe" else self.policies.cascade
            return await run(request, body.frugalserve, header, stream)
        rec = RoutingRecord(policy="direct")
        if stream:
            return Outcome(rec, stream_from=name)
        c = await self._run_one(name, request)
        rec.runs.append(ExpertRun(name, c.prompt_tokens, c.completion_tokens,
                                  await self._cost(name, c.prompt_tokens, c.completion_tokens)))
        rec.answered_by = name
        return Outcome(rec, completion=c)

    def _remember(self, kind: str, request, header, rec: RoutingRecord, text: str) -> None:
        if kind == "policy" and self.policies is not None and rec.answered_by:
            self.policies.remember(request, header, rec.answered_by, text)

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "experts": self.names, "version": __version__,
                "policies": list(self.policies.names) if self.policies else []}

    @app.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for name in self.names:
            info = await self._expert_info(name)
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
                detail = ({"tiers": list(art.cascade.order),
                           "expected_cost": art.cascade.cost,
                           "calibrated_accuracy": art.cascade.accuracy}
                          if name == "cascade" else {"experts": art.gate.experts})
                data.append({"id": name, "object": "model", "created": 0,
                             "owned_by": "frugalserve",
                             "frugalserve": {"kind": "policy", **detail}})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        kind, name = self._route(body)
        try:
            messages = body.plain_messages()
        except UnsupportedParameter as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        request = GenerationRequest(
            messages=messages, params=self._params(body, body.wanted_tokens()),
            request_id=new_id("chatcmpl"),
        )
        return await self._respond(kind, name, request, body, raw, chat=True)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        kind, name = self._route(body)
        request = GenerationRequest(
            prompt=body.prompt, params=self._params(body, body.wanted_tokens()),
            request_id=new_id("cmpl"),
        )
        return await self._respond(kind, name, request, body, raw, chat=False)

    @staticmethod
    def _params(body, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, stop=body.stops(), seed=body.seed,
                              ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)

    async def _respond(self, kind, name, request, body, raw: Request, chat: bool):
        header = raw.headers.get(SESSION_HEADER)
        raw.state.model = name
        raw.state.policy = name if kind == "policy" else "direct"
        raw.state.streaming = bool(body.stream)
        timing = _Timing(getattr(raw.state, "started", time.perf_counter()), name,
                         raw.state.policy)
        outcome = await self._outcome(kind, name, request, body, header, body.stream)
        logprobs = bool(body.logprobs)
        if outcome.stream_from is not None:
            return await self._stream_live(kind, outcome.stream_from, outcome.record, request,
                                           body, header, chat, timing)
        c, rec = outcome.completion, outcome.record
        self._remember(kind, request, header, rec, c.text)
        record_outcome(rec.as_dict(), name)
        if body.stream:  # held until accepted (cascade, top-k): sent as one piece
            events = self._sse_held(c, rec, request, body, chat, timing)
            return StreamingResponse(events, media_type="text/event-stream")
        make = chat_body if chat else text_body
        return JSONResponse(make(request.request_id, now(), c, rec, logprobs))

    # -- streaming --------------------------------------------------------------------------

    def _chunker(self, request, body, chat: bool, model: str):
        rid, created = request.request_id, now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, c: Completion | None, first=False):
            lp = None
            if body.logprobs and c is not None:
                lp = chat_logprobs(c) if chat else completion_logprobs(c)
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [choice]}

        def tail(rec: RoutingRecord, c: Completion) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [], "usage": rec.usage(c), "frugalserve": rec.as_dict()}

        return chunk, tail

    async def _sse_held(self, c: Completion, rec, request, body, chat,
                        timing: _Timing) -> AsyncIterator[str]:
        chunk, tail = self._chunker(request, body, chat, rec.answered_by)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if chat:
            yield sse(chunk(None, None, None, first=True))
        last = chunk(c.text, c.finish_reason, c)
        last["frugalserve"] = rec.as_dict()
        timing.token()
        yield sse(last)
        if include_usage:
            yield sse(tail(rec, c))
        yield sse("[DONE]")
        timing.done()

    async def _stream_live(self, kind, expert, rec, request, body, header, chat: bool,
                           timing: _Timing):
        if expert in self.remote:  # remote experts answer whole; stream the answer held
            c = await self._run_one(expert, request)
            rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens,
                                      await self._cost(expert, c.prompt_tokens,
                                                       c.completion_tokens)))
            rec.answered_by = expert
            self._remember(kind, request, header, rec, c.text)
            record_outcome(rec.as_dict(), expert)
            return StreamingResponse(self._sse_held(c, rec, request, body, chat, timing),
                                     media_type="text/event-stream")
        handle, routed = self._target(expert, request)
        gen = handle.options(stream=True).generate_stream.remote(routed)
        try:  # the first delta comes before any byte is sent, so errors are still a 4xx
            first = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
        except StopAsyncIteration:
            raise APIError(503, f"expert {expert!r} ended the stream without output") from None
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001
            gen.cancel()
            raise _to_api_error(exc, expert, "messages" if chat else "prompt") from None
        info = await self._expert_info(expert)
        events = self._sse_live(kind, expert, info, rec, request, body, header, chat, first, gen,
                                timing)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _sse_live(self, kind, expert, info, rec, request, body, header, chat, first,
                        gen, timing: _Timing) -> AsyncIterator[str]:
        chunk, tail = self._chunker(request, body, chat, expert)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if chat:
            yield sse(chunk(None, None, None, first=True))
        delta, started = first, time.monotonic()
        try:
            while True:
                c = delta.completion
                if c is not None:
                    cost = (c.prompt_tokens * info["cost_per_1k_prompt"]
                            + c.completion_tokens * info["cost_per_1k_completion"]) / 1000.0
                    rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens, cost))
                    rec.answered_by = expert
                    last = chunk(delta.text, delta.finish_reason, c)
                    last["frugalserve"] = rec.as_dict()
                    timing.token()
                    yield sse(last)
                    if include_usage:
                        yield sse(tail(rec, c))
                    self._remember(kind, request, header, rec, c.text)
                    record_outcome(rec.as_dict(), expert)
                    break
                if delta.text:
                    timing.token()
                    yield sse(chunk(delta.text, None, None))
                if time.monotonic() - started > self.timeout_s:
                    raise asyncio.TimeoutError
                delta = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
        except StopAsyncIteration:
            pass
        except (asyncio.CancelledError, GeneratorExit):
            gen.cancel()  # the client went away: free its place in the expert's batch
            raise
        except BaseException as exc:  # noqa: BLE001 - headers are sent: report in-band
            yield sse(_to_api_error(exc, expert).body())
        yield sse("[DONE]")
        timing.done()

