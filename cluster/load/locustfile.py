"""Locust users that chat with frugalserve: mixed domains and models, streaming and not.

Each user loops without pause (concurrency = users): it draws a prompt (arithmetic, text
operations or facts, from `frugalserve.experts.zoo.tasks` where present), a model (`moe`, `cascade`
or an expert: every id `/v1/models` lists, or `--fs-models`) and streaming or not
(`--fs-stream-share`), and sends `/v1/chat/completions`. Events in locust's stats:

- `POST chat <model> stream|json`: the whole request, to the last byte of the stream; its
  "content size" is the completion tokens (the response's `usage`), so locust's totals count
  tokens, not bytes.
- `TTFT <model>`: streamed requests only, time to the first non-empty `delta.content`.
- `ITL <model>`: every gap between two consecutive content chunks (vLLM's pooled ITL, not
  LLMPerf's per-request average). A held answer (cascade, which streams once a tier is accepted)
  comes as one chunk and adds none.

With `--fs-request-log FILE` each request also appends one JSON line to FILE: `t0` / `t1` (wall
clock), `model`, `stream`, `ok`, `status`, `error` (`http_<status>:<code>`, `stream:<code>`,
`no_response`, ...), `tokens` (content chunks received, also before a failure), `retries` (how
many attempts failed, from the routing record), `retried` (each as "expert code") and `answered_by`: what the chaos run (`cluster/load/chaos.py`) reads.

Use headless through `python -m frugalserve.cluster.load.run`, or with locust's own CLI / web UI:
`locust -f cluster/load/locustfile.py --host http://127.0.0.1:8000`.
"""

from __future__ import annotations

import itertools
import json
import random
import time

import requests
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

ENDPOINT = "/v1/chat/completions"
EXCLUDED_BY_DEFAULT = frozenset({"default"})


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("frugalserve")
    group.add_argument("--fs-models", default="", help="comma-separated models to mix "
                       "(default: every id /v1/models lists)")
    group.add_argument("--fs-stream-share", type=float, default=0.5,
                       help="share of requests that stream (0..1)")
    group.add_argument("--fs-max-tokens", type=int, default=16, help="max_tokens per request")
    group.add_argument("--fs-budget", type=float, default=None,
                       help="frugalserve.budget (cost units) sent with policy requests")
    group.add_argument("--fs-seed", type=int, default=None, help="seed for prompts and choices")
    group.add_argument("--fs-request-log", default="", help="write one JSON line per request "
                       "(times, outcome, error kind, tokens seen, retries) to this file")
    group.add_argument("--fs-timeout", type=float, default=None,
                       help="client timeout per request in seconds (default: none)")


# -- prompts ---------------------------------------------------------------------------------

DOMAINS = ("arith", "text", "facts")


def _builtin_prompt(domain: str, rng: random.Random) -> str:
    if domain == "arith":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        return f"What is {a} {rng.choice('+-*')} {b}? Answer with the number only."
    if domain == "text":
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        return f"Reverse the word '{word}'."
    country = rng.choice(["Avaloria", "Brenmark", "Cestova", "Dunhallow", "Estrelle"])
    return f"What is the capital of {country}?"


def make_prompt(rng: random.Random) -> tuple[str, str]:
    """(domain, prompt): the project's task suite where installed, a small generator otherwise."""
    domain = rng.choice(DOMAINS)
    try:  # optional: the locustfile also runs where frugalserve is not installed
        from frugalserve.experts.zoo.tasks import sample
    except ImportError:
        return domain, _builtin_prompt(domain, rng)
    return domain, sample(domain, rng).prompt


def _code(resp) -> str | None:
    try:
        return resp.json()["error"]["code"]
    except Exception:  # noqa: BLE001 - not an OpenAI-shaped error
        return None


# -- the user --------------------------------------------------------------------------------


def _option(environment, name: str, default):
    value = getattr(environment.parsed_options, name, None) if environment.parsed_options else None
    return default if value is None else value


def list_models(host: str, timeout: float = 30) -> list[str]:
    response = requests.get(f"{host.rstrip('/')}/v1/models", timeout=timeout)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"] if m["id"] not in EXCLUDED_BY_DEFAULT]


class ChatUser(HttpUser):
    wait_time = constant(0)
    _models: list[str] | None = None  # shared by every user of the process
    _numbers = itertools.count()

    def on_start(self) -> None:
        env = self.environment
        seed = _option(env, "fs_seed", None)
        self.rng = random.Random(None if seed is None else seed * 100_003 + next(self._numbers))
        self.stream_share = float(_option(env, "fs_stream_share", 0.5))
        self.max_tokens = int(_option(env, "fs_max_tokens", 16))
        self.budget = _option(env, "fs_budget", None)
        timeout = _option(env, "fs_timeout", None)
        self.timeout = float(timeout) if timeout else None
        path = _option(env, "fs_request_log", "")
        self.log = open(path, "a") if path else None  # noqa: SIM115 - one per user, for its life
        if ChatUser._models is None:
            chosen = [m.strip() for m in str(_option(env, "fs_models", "")).split(",") if m.strip()]
            ChatUser._models = chosen or list_models(self.host or "")
        if not ChatUser._models:
            raise StopUser()

    def body(self, model: str, stream: bool) -> dict:
        _, prompt = make_prompt(self.rng)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.budget is not None and model in ("moe", "cascade"):
            body["frugalserve"] = {"budget": self.budget}
        return body

    @task
    def chat(self) -> None:
        model = self.rng.choice(ChatUser._models or [])
        stream = self.rng.random() < self.stream_share
        name = f"chat {model} {'stream' if stream else 'json'}"
        body = self.body(model, stream)
        seen: dict = {"tokens": 0, "record": None, "error": None}
        started, t0 = time.perf_counter(), time.time()
        with self.client.post(ENDPOINT, json=body, name=name, stream=stream, timeout=self.timeout,
                              catch_response=True) as resp:
            try:
                if resp.status_code == 0:  # no HTTP response: connection refused, reset, ...
                    seen["error"] = "no_response"
                    resp.failure(f"no response: {resp.error}")
                elif resp.status_code != 200:
                    seen["error"] = f"http_{resp.status_code}:{_code(resp)}"
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                elif stream:
                    tokens = self.read_stream(resp, model, started, seen)
                    resp.request_meta["response_length"] = tokens
                else:
                    resp.request_meta["response_length"] = self.read_json(resp, seen)
            except Exception as exc:  # noqa: BLE001 - any broken answer is a failed request
                seen["error"] = seen["error"] or type(exc).__name__
                resp.failure(f"{type(exc).__name__}: {exc}")
            # the whole request, body included (locust stops its clock at the headers)
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        if self.log is not None:
            rec = seen["record"] or {}
            self.log.write(json.dumps({
                "t0": t0, "t1": time.time(), "model": model, "stream": stream,
                "ok": seen["error"] is None, "status": resp.status_code, "error": seen["error"],
                "tokens": seen["tokens"], "retries": len(rec.get("retries", [])),
                "retried": [f"{x.get('expert')} {x.get('code')}" for x in rec.get("retries", [])],
                "answered_by": rec.get("answered_by")}) + "\n")
            self.log.flush()

    @staticmethod
    def read_json(resp, seen: dict) -> int:
        data = resp.json()
        seen["record"] = data.get("frugalserve")
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"no message content in {str(data)[:200]}")
        return int(data["usage"]["completion_tokens"])

    def read_stream(self, resp, model: str, started: float, seen: dict) -> int:
        """Read the SSE stream to `[DONE]`; fire TTFT and ITL events; return completion tokens.
        `seen` gets the content chunks so far, the routing record and an in-stream error's code."""
        last = None
        chunks = 0
        usage = None
        for line in resp.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                seen["error"] = f"stream:{event['error'].get('code')}"
                raise RuntimeError(f"in-stream error: {event['error'].get('message')}")
            usage = event.get("usage") or usage
            seen["record"] = event.get("frugalserve") or seen["record"]
            if not any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                continue
            now = time.perf_counter()
            if last is None:
                self.fire("TTFT", model, (now - started) * 1000)
            else:
                self.fire("ITL", model, (now - last) * 1000)
            last, chunks = now, chunks + 1
            seen["tokens"] = chunks
        else:
            seen["error"] = "stream_cut"
            raise RuntimeError("stream ended without [DONE]")
        return int(usage["completion_tokens"]) if usage else chunks

    def fire(self, kind: str, model: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=model, response_time=ms, response_length=0,
            exception=None, context={})
