"""`frugalserve eval --url`: the harness against the running application gives the rows an
in-process run gives."""

from __future__ import annotations

import pytest
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.zoo import evaluate as E
from frugalserve.experts.zoo import tasks as T

pytestmark = pytest.mark.slow


def test_url_mode_matches_in_process(app_url):
    tasks_ = T.generate("test", 6)
    experts = [("demo-llama", resolve_model_path("builtin:demo-llama"))]
    live = E.evaluate(experts, tasks_, url=app_url, progress=False)
    local = E.evaluate(experts, tasks_, progress=False)
    assert len(live) == len(local) == 6
    for a, b in zip(live, local):
        assert a["id"] == b["id"] and a["answer"] == b["answer"]
        assert a["prompt_tokens"] == b["prompt_tokens"]
        assert a["completion_tokens"] == b["completion_tokens"]
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-3)
        assert a["cost"] == pytest.approx(b["cost"], rel=1e-6)
