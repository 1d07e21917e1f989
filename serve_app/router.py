"""The router ingress: speaks the OpenAI API and dispatches each request to an expert.

It holds DeploymentHandles to the experts and never loads a model. The `model` field names an
expert directly (or `default`); routing policies plug in at `_route`.
"""


import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from frugalserve import __version__
from frugalserve.experts.engine import Completion, GenerationRequest, SamplingParams
from frugalserve.serve_app.config import AppConfig
from frugalserve.serve_app.errors import APIError, install_error_handlers
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

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="frugalserve",
    version=__version__,
    description="OpenAI-compatible router that answers with the cheapest good-enough expert.",
)
install_error_handlers(app)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the original is its `cause`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _to_api_error(exc: BaseException, expert: str, prompt_param: str = "messages") -> APIError:
    from frugalserve.experts.transformers_engine import PromptTooLongError

    inner = _unwrap(exc)
    if isinstance(inner, PromptTooLongError):
        return APIError(400, str(inner), param=prompt_param, code="context_length_exceeded")
    if isinstance(inner, (ValueError, UnsupportedParameter)):
        return APIError(400, f"expert {expert!r} rejected the request: {inner}")
    if isinstance(inner, asyncio.TimeoutError):
        return APIError(504, f"expert {expert!r} did not answer in time", type="timeout")
    return APIError(
        503, f"expert {expert!r} failed: {type(inner).__name__}: {inner}",
        type="server_error", code="expert_unavailable",
    )


@serve.ingress(app)
class Router:
    def __init__(self, config: dict, experts: dict):
        self.config = AppConfig.model_validate(config)
        self.experts = experts  # {name: DeploymentHandle}
        self._info: dict[str, dict] = {}
        self.timeout_s = self.config.router.request_timeout_s

    # -- expert facts ---------------------------------------------------------------------

    async def _expert_info(self, name: str) -> dict:
        if name not in self._info:
            self._info[name] = await self.experts[name].info.remote()
        return self._info[name]

    def _cost(self, info: dict, c: Completion) -> float:
        return (
            c.prompt_tokens * info["cost_per_1k_prompt"]
            + c.completion_tokens * info["cost_per_1k_completion"]
        ) / 1000.0

    # -- routing --------------------------------------------------------------------------

    def _route(self, body: ChatCompletionRequest | CompletionRequest) -> str:
        """Which expert answers. Policies (`moe`, `cascade`) extend this."""
        options = body.frugalserve
        if options is not None and options.expert is not None:
            return self._known_expert(options.expert, param="frugalserve.expert")
        if options is not None and options.policy is not None:
            raise APIError(
                400, f"unknown routing policy {options.policy!r}; this application has none "
                "configured", param="frugalserve.policy", code="unknown_policy",
            )
        model = body.model
        if model == "default":
            return self.config.default_model or self.config.experts[0].name
        return self._known_expert(model, param="model")

    def _known_expert(self, name: str, param: str) -> str:
        if name in self.experts:
            return name
        raise APIError(
            404, f"The model {name!r} does not exist; available: {sorted(self.experts)}",
            type="invalid_request_error", param=param, code="model_not_found",
        )

    # -- request building -------------------------------------------------------------------

    @staticmethod
    def _params(body, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )

    async def _run_one(self, expert: str, request: GenerationRequest) -> Completion:
        handle = self.experts[expert]
        param = "messages" if request.messages is not None else "prompt"
        try:
            return await asyncio.wait_for(handle.generate.remote(request), self.timeout_s)
        except APIError:
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an HTTP error
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _to_api_error(exc, expert, param) from None

    async def _answer(self, expert: str, request: GenerationRequest, policy: str):
        c = await self._run_one(expert, request)
        info = await self._expert_info(expert)
        rec = RoutingRecord(policy=policy, answered_by=expert)
        rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens, self._cost(info, c)))
        return c, rec

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "experts": sorted(self.experts), "version": __version__}

    @app.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for name in self.experts:
            info = await self._expert_info(name)
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "frugalserve",
                    "max_model_len": info["max_context"],
                    "frugalserve": {
                        "kind": "expert",
                        "num_parameters": info["num_parameters"],
                        "cost_per_1k_prompt": info["cost_per_1k_prompt"],
                        "cost_per_1k_completion": info["cost_per_1k_completion"],
                        "engine": info["engine"],
                        "attention_backend": info["attention_backend"],
                    },
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        expert = self._route(body)
        try:
            messages = body.plain_messages()
        except UnsupportedParameter as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        request = GenerationRequest(
            messages=messages, params=self._params(body, body.wanted_tokens()),
            request_id=new_id("chatcmpl"),
        )
        if body.stream:
            return await self._stream(expert, request, body, chat=True)
        c, rec = await self._answer(expert, request, policy="direct")
        return JSONResponse(chat_body(request.request_id, now(), c, rec, body.logprobs))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        expert = self._route(body)
        request = GenerationRequest(
            prompt=body.prompt, params=self._params(body, body.wanted_tokens()),
            request_id=new_id("cmpl"),
        )
        if body.stream:
            return await self._stream(expert, request, body, chat=False)
        c, rec = await self._answer(expert, request, policy="direct")
        return JSONResponse(text_body(request.request_id, now(), c, rec, bool(body.logprobs)))

    # -- streaming --------------------------------------------------------------------------

    async def _stream(self, expert: str, request: GenerationRequest, body, chat: bool):
        handle = self.experts[expert].options(stream=True)
        gen = handle.generate_stream.remote(request)
        try:  # the first delta comes before any byte is sent, so errors are still a 4xx
            first = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
        except StopAsyncIteration:
            raise APIError(503, f"expert {expert!r} ended the stream without output") from None
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, asyncio.CancelledError):
                raise
            gen.cancel()
            param = "messages" if chat else "prompt"
            raise _to_api_error(exc, expert, param) from None
        info = await self._expert_info(expert)
        events = self._sse_events(expert, info, request, body, chat, first, gen)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _sse_events(
        self, expert, info, request, body, chat: bool, first, gen
    ) -> AsyncIterator[str]:
        rid, created = request.request_id, now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        want_logprobs = bool(body.logprobs)

        def chunk(choice: dict) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": expert,
                    "choices": [choice]}

        if chat:
            yield sse(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}))
        delta, started = first, time.monotonic()
        try:
            while True:
                c = delta.completion
                if delta.text or c is not None:
                    lp = None
                    if want_logprobs and c is not None:
                        lp = chat_logprobs(c) if chat else completion_logprobs(c)
                    if chat:
                        choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                                  "logprobs": lp, "finish_reason": delta.finish_reason}
                    else:
                        choice = {"index": 0, "text": delta.text, "logprobs": lp,
                                  "finish_reason": delta.finish_reason}
                    out = chunk(choice)
                    if c is not None:  # the last content chunk carries the routing record
                        rec = RoutingRecord(policy="direct", answered_by=expert)
                        rec.runs.append(ExpertRun(expert, c.prompt_tokens, c.completion_tokens,
                                                  self._cost(info, c)))
                        out["frugalserve"] = rec.as_dict()
                    yield sse(out)
                    if c is not None:
                        if include_usage:
                            yield sse({"id": rid, "object": obj, "created": created,
                                       "model": expert, "choices": [], "usage": rec.usage(c),
                                       "frugalserve": rec.as_dict()})
                        break
                if time.monotonic() - started > self.timeout_s:
                    raise asyncio.TimeoutError
                delta = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
        except StopAsyncIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - headers are sent: report in-band
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                gen.cancel()
                raise
            err = _to_api_error(exc, expert)
            yield sse(err.body())
        yield sse("[DONE]")
