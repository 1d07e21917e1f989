"""The expert deployment class without Serve and without a model: a fake engine behind the
engine contract. Serve's batcher (`@serve.batch`) runs in any event loop, so the static path is
exercised for real; the continuous path hands each request straight to the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from frugalserve.experts.engine import (
    Admission,
    Completion,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
    StreamDelta,
)
from frugalserve.serve_app.expert import ExpertServer


class FakeEngine(Engine):
    """Answers each prompt with its characters reversed, one character per step."""

    def __init__(self, batches_itself: bool):
        self.batches_itself = batches_itself  # type: ignore[misc]
        self.name, self.tokenizer, self.default_max_tokens, self.adapters = "fake", None, 8, ()
        self.batches: list[int] = []
        self.streams = 0
        self.cancelled: list[str] = []
        self.released = 0

    @property
    def max_context(self) -> int:
        return 32

    def info(self) -> EngineInfo:
        return EngineInfo(name="fake", engine="fake", batching="continuous" if self.batches_itself
                          else "static", device="cpu", dtype="float32", num_parameters=2_000_000,
                          max_context=32, default_max_tokens=8, attention={"attention": "none"})

    def encode(self, request: GenerationRequest) -> list[int]:
        return [ord(c) for c in request.prompt or ""]

    def _answer(self, a: Admission) -> str:
        return "".join(chr(t) for t in reversed(a.prompt_ids))[: a.max_tokens]

    def _done(self, a: Admission) -> Completion:
        text = self._answer(a)
        return Completion(text, tuple(map(ord, text)), (-0.1,) * len(text), len(a.prompt_ids),
                          len(text), "length")

    async def stream_batch(self, admissions) -> AsyncIterator[list[StreamDelta | None]]:
        self.batches.append(len(admissions))
        answers = [self._answer(a) for a in admissions]
        for i in range(max(map(len, answers)) + 1):
            await asyncio.sleep(0)
            yield [None if i > len(t) else StreamDelta(t[i:i + 1]) if i < len(t) else
                   StreamDelta("", finish_reason="length", completion=self._done(a))
                   for t, a in zip(answers, admissions)]

    async def stream(self, admission: Admission, *, final_only: bool = False,
                     ) -> AsyncIterator[StreamDelta]:
        if not self.batches_itself:
            async for d in super().stream(admission):
                yield d
            return
        self.streams += 1
        for ch in self._answer(admission):
            await asyncio.sleep(0.001)
            yield StreamDelta(ch)
        yield StreamDelta("", finish_reason="length", completion=self._done(admission))

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def release(self, admission: Admission) -> None:
        self.released += 1


@pytest.fixture(autouse=True)
def replica_context(monkeypatch):
    """Serve's batcher reads the replica's max_ongoing_requests from the replica context, which
    exists only inside a running deployment: give it the one the spec would."""
    from ray.serve import batching

    ctx = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(batching.serve, "get_replica_context", lambda: ctx)


SPEC = {"name": "fake", "engine": {"model": "builtin:demo-llama", "scheduler": {"max_batch_size": 16}},
        "deployment": {"batch_wait_timeout_s": 5.0}}


def server(batches_itself: bool) -> ExpertServer:
    # Serve keeps one batch queue per decorated function (one replica per process); each test
    # runs its own event loop, so each gets a class with a fresh batcher.
    from ray import serve

    class Fresh(ExpertServer):
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def _batched(self, admissions):
            async for step in self._batch_steps(admissions):
                yield step

    return Fresh(SPEC, engine_factory=lambda spec, share, name: FakeEngine(batches_itself))


def req(text: str, max_tokens: int | None = None, rid: str = "") -> GenerationRequest:
    return GenerationRequest(prompt=text, params=SamplingParams(max_tokens=max_tokens), request_id=rid)


def test_static_engine_gets_one_batch_of_concurrent_requests():
    s = server(False)

    async def go():
        return await asyncio.gather(*(s.generate(req(f"prompt {i}")) for i in range(16)))

    out = asyncio.run(go())
    assert s.engine.batches == [16]  # max_batch_size reached: the batch closed at once
    assert [c.text for c in out] == [f"prompt {i}"[::-1][:8] for i in range(16)]
    assert s.engine.released == 16 and s.engine.cancelled == []


def test_continuous_engine_gets_every_request_at_once():
    s = server(True)

    async def go():
        return await asyncio.gather(*(s.generate(req(f"p{i}", 3)) for i in range(5)))

    out = asyncio.run(go())
    assert s.engine.streams == 5 and s.engine.batches == []
    assert [c.text for c in out] == [f"p{i}"[::-1] for i in range(5)]
    assert s._in_flight == 0


@pytest.mark.parametrize("batches_itself", [False, True])
def test_a_request_that_does_not_fit_fails_alone(batches_itself):
    s = server(batches_itself)

    async def go():
        return await asyncio.gather(s.generate(req("x" * 40)), s.generate(req("fits", 2)),
                                    return_exceptions=True)

    bad, good = asyncio.run(go())
    assert isinstance(bad, PromptTooLongError)
    assert isinstance(good, Completion) and good.text == "st"


def test_a_caller_that_leaves_mid_stream_is_cancelled():
    s = server(True)

    async def go():
        gen = s.generate_stream(req("a long prompt", 12, rid="r1"))
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(go())
    assert s.engine.cancelled == ["r1"] and s._in_flight == 0


def test_a_finished_request_is_never_cancelled():
    s = server(False)
    asyncio.run(s.generate(req("done", rid="r2")))
    assert s.engine.cancelled == []


def test_info_reports_what_the_engine_says():
    info = server(True).info()
    assert info["batching"] == "continuous" and info["attention"] == {"attention": "none"}
    assert info["cost_per_1k_prompt"] == pytest.approx(2.0)  # one unit per million parameters
