"""A remote OpenAI-compatible endpoint as an expert (`kind: openai`), e.g. a hosted model at the
end of a cascade: the HTTP `ExpertClient`. The API key comes from an environment variable and
never reaches logs. It answers whole, so a stream of it is its answer in one piece."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
from frugalserve.experts.engine import Completion, GenerationRequest
from frugalserve.serve_app.clients import ExpertStream, expert_error, prompt_param
from frugalserve.serve_app.config import ExpertConfig
from frugalserve.serve_app.errors import APIError


class RemoteExpertError(RuntimeError):
    """The remote endpoint could not be reached or answered with an error."""


class RemoteClient:
    def __init__(self, expert: ExpertConfig, timeout_s: float):
        assert expert.remote is not None  # make_clients gives this client remote experts only
        self.expert, self.spec, self.name, self.timeout_s = expert, expert.remote, expert.name, timeout_s
        spec = self.spec
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            base_url=spec.base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=spec.connect_timeout_s),
        )

    async def info(self) -> dict[str, Any]:
        e, s = self.expert, self.spec
        return {
            "name": e.name, "model": s.model or e.name, "engine": "openai",
            "max_context": s.max_context, "max_tokens_default": None,
            "num_parameters": 0, "cost_per_1k_prompt": e.cost_per_1k_prompt,
            "cost_per_1k_completion": e.cost_per_1k_completion,
            "batching": "remote", "attention": {"attention": "remote"},
            "description": e.description,
        }

    async def generate(self, request: GenerationRequest) -> Completion:
        try:
            return await asyncio.wait_for(self._post(request), self.timeout_s)
        except RemoteExpertError as exc:
            raise APIError(503, str(exc), type="server_error", code="expert_unavailable") from None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to an OpenAI-shaped error
            raise expert_error(exc, self.name, prompt_param(request)) from None

    async def stream(self, request: GenerationRequest) -> ExpertStream:
        return ExpertStream.whole(self.name, await self.generate(request))

    async def _post(self, request: GenerationRequest) -> Completion:
        p = request.params
        body: dict[str, Any] = {"model": self.spec.model or self.name, "temperature": p.temperature,
                "top_p": p.top_p, "logprobs": True}
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        path = "/chat/completions" if request.messages is not None else "/completions"
        if request.messages is not None:
            body["messages"] = list(request.messages)
        else:
            body["prompt"], body["logprobs"] = request.prompt, 1
        try:
            r = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise RemoteExpertError(
                f"remote expert {self.name!r} at {self.spec.base_url} is unreachable: "
                f"{type(exc).__name__}") from None
        if r.status_code >= 400:
            raise RemoteExpertError(f"remote expert {self.name!r} answered {r.status_code}: "
                                    f"{r.text[:300]}")
        return _completion(r.json(), chat=request.messages is not None)

    async def aclose(self) -> None:
        await self._client.aclose()


def _completion(data: dict, chat: bool) -> Completion:
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    if chat:
        text = choice["message"]["content"] or ""
        content = (choice.get("logprobs") or {}).get("content") or []
        lps = tuple(float(t["logprob"]) for t in content)
        toks = tuple(str(t.get("token", "")) for t in content)
    else:
        text = choice.get("text", "")
        lp = choice.get("logprobs") or {}
        lps = tuple(float(x) for x in lp.get("token_logprobs") or [] if x is not None)
        toks = tuple(lp.get("tokens") or [])
    n_out = int(usage.get("completion_tokens", len(lps)))
    return Completion(text=text, token_ids=(), token_logprobs=lps,
                      prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=n_out,
                      finish_reason=choice.get("finish_reason") or "stop", token_texts=toks)
