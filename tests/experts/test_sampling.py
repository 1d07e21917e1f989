"""The sampler (experts/sampling.py) on hand-made logits, and the sampling fields on both
transformers engines with a real zoo model: what each field must do, and a seed that gives the
same tokens whatever shares the batch."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys

import jsonschema
import pytest
import torch
from frugalserve.experts.engine import (
    GenerationRequest,
    Guide,
    SamplingParams,
    UnsupportedFeatureError,
)
from frugalserve.experts.paged.engine import PagedEngine
from frugalserve.experts.sampling import RowState, choose_tokens, row_state
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine

V = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def state(params: SamplingParams, tokens=(), prompt: int = 0) -> RowState | None:
    return row_state(params, list(tokens), prompt, None, torch.device("cpu"))


def test_a_greedy_batch_is_one_argmax():
    x = logits(4)
    assert torch.equal(choose_tokens(x, [SamplingParams()] * 4, [None] * 4), x.argmax(-1))


def test_top_k_1_is_greedy_whatever_the_temperature():
    x = logits(6)
    params = [SamplingParams(temperature=2.0, top_k=1, seed=s) for s in range(6)]
    assert torch.equal(choose_tokens(x, params, [state(p) for p in params]), x.argmax(-1))


def test_min_p_and_top_p_keep_only_the_likely_tokens():
    x = logits(1)
    x[0, 7] = 20.0  # one token far ahead of the rest
    for p in (SamplingParams(temperature=1.0, min_p=0.5, seed=1),
              SamplingParams(temperature=1.0, top_p=0.5, seed=1)):
        draws = {int(choose_tokens(x, [p], [state(p)])[0]) for _ in range(20)}
        assert draws == {7}


def test_top_k_draws_only_among_the_k_best():
    x = logits(1, seed=3)
    best = set(x[0].topk(3).indices.tolist())
    gen_params = SamplingParams(temperature=5.0, top_k=3, seed=9)
    st = state(gen_params)
    draws = {int(choose_tokens(x, [gen_params], [st])[0]) for _ in range(200)}
    assert draws <= best and len(draws) > 1


def test_logit_bias_bans_and_forces():
    x = logits(2)
    top = int(x[0].argmax())
    banned = SamplingParams(logit_bias=((top, -100.0),))
    forced = SamplingParams(logit_bias=((11, 100.0),))
    out = choose_tokens(x, [banned, forced], [state(banned), state(forced)])
    assert int(out[0]) != top and int(out[1]) == 11


def test_penalties_push_away_from_what_was_generated():
    x = torch.zeros(1, V)
    x[0, 3], x[0, 4] = 2.0, 1.5  # 3 is best, 4 close behind
    for p in (SamplingParams(repetition_penalty=2.0), SamplingParams(frequency_penalty=1.0),
              SamplingParams(presence_penalty=1.0)):
        st = state(p, tokens=[9, 3], prompt=1)  # the answer so far: token 3
        assert int(choose_tokens(x, [p], [st])[0]) == 4
    p = SamplingParams(repetition_penalty=2.0)  # repetition also counts the prompt
    assert int(choose_tokens(x, [p], [state(p, tokens=[3, 9], prompt=1)])[0]) == 4
    p = SamplingParams(presence_penalty=1.0)  # presence does not
    assert int(choose_tokens(x, [p], [state(p, tokens=[3, 9], prompt=1)])[0]) == 3


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch():
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = [int(choose_tokens(logits(1, seed=t), [p], [st])[0])
             for st in [state(p)] for t in range(8)]
    others = [SamplingParams(temperature=0.7, seed=s) for s in range(3)]
    sts = [state(p)] + [state(o) for o in others]
    shared = []
    for t in range(8):
        batch = torch.cat([logits(1, seed=t), logits(3, seed=100 + t)])
        shared.append(int(choose_tokens(batch, [p, *others], sts)[0]))
    assert shared == alone


def test_top_logprobs_are_the_raw_distributions_best():
    x = logits(1)
    p = SamplingParams(top_logprobs=3)
    st = state(p)
    choose_tokens(x, [p], [st])
    want = torch.log_softmax(x[0], -1).topk(3)
    assert [t for t, _ in st.top[0]] == want.indices.tolist()
    assert [lp for _, lp in st.top[0]] == pytest.approx(want.values.tolist())


# -- on the engines, with a zoo model -------------------------------------------------------------

MESSAGES = ({"role": "user", "content": "What is 12 + 30?"},)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module", params=["static", "paged"])
def engine(request):
    kind = TransformersEngine if request.param == "static" else PagedEngine
    eng = kind.from_path(resolve_model_path("builtin:tier-s"), device="cpu", dtype="float32")
    yield eng
    if hasattr(eng, "close"):
        eng.close()


def run(engine, *params: SamplingParams):
    return asyncio.run(engine.generate([GenerationRequest(messages=MESSAGES, params=p)
                                        for p in params]))


def test_n_copies_batch_together_and_choice_0_is_the_single_answer(engine):
    n3, single = run(engine, SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3),
                     SamplingParams(max_tokens=6, temperature=1.0, seed=5))
    assert [c.index for c in n3.choices] == [0, 1, 2]
    assert n3.text == single.text  # choice k draws with seed + k
    assert n3.generated_tokens == sum(c.completion_tokens for c in n3.choices)
    (again,) = run(engine, SamplingParams(max_tokens=6, temperature=1.0, seed=6))
    assert again.text == n3.others[0].text


def test_json_schema_output_validates(engine):
    (c,) = run(engine, SamplingParams(max_tokens=24, guide=Guide("json_schema", json.dumps(SCHEMA))))
    jsonschema.validate(json.loads(c.text), SCHEMA)
    assert c.finish_reason == "stop"


def test_without_the_library_structured_output_is_refused_clearly(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as on an image without it
    with pytest.raises(UnsupportedFeatureError, match="xgrammar") as info:
        engine.admit(GenerationRequest(messages=MESSAGES, params=SamplingParams(
            guide=Guide("json_object"))))
    assert info.value.param == "response_format"


def test_tools_render_through_a_template_that_supports_them(tmp_path):
    folder = tmp_path / "tools-model"
    shutil.copytree(resolve_model_path("builtin:demo-llama"), folder)
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% if tools %}<|system|>tools: {{ tools | map(attribute='function.name') "
        "| join(',') }}<|end|>{% endif %}{% for message in messages %}{{ '<|' + message['role'] + "
        "'|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|assistant|>' }}{% endif %}")
    eng = TransformersEngine.from_path(folder, device="cpu", dtype="float32")
    tools = ({"type": "function", "function": {"name": "get_weather", "parameters": {}}},)
    plain = eng.admit(GenerationRequest(messages=MESSAGES))
    with_tools = eng.admit(GenerationRequest(messages=MESSAGES, tools=tools))
    assert "get_weather" in eng.tokenizer.decode(list(with_tools.prompt_ids))
    assert len(with_tools.prompt_ids) > len(plain.prompt_ids)
    with pytest.raises(UnsupportedFeatureError) as info:
        eng.admit(GenerationRequest(messages=MESSAGES, tools=tools, tool_choice="required"))
    assert info.value.param == "tool_choice"
