"""The evaluation harness: its rows are what the engine said, its table sums them up."""

from __future__ import annotations

import asyncio
import json

import pytest
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.zoo import evaluate as E
from frugalserve.experts.zoo import tasks as T

REQUIRED = ("expert", "domain", "difficulty", "prompt", "answer", "correct", "logprob_mean", "logprob_min",
            "logprob_first", "prompt_tokens", "completion_tokens", "cost", "latency_s")


@pytest.mark.parametrize("name", ["tier-s", "expert-text"])  # a Llama and a Falcon with ALiBi
def test_rows_match_a_direct_engine_call(name):
    from frugalserve.experts.engine import GenerationRequest, SamplingParams
    from frugalserve.experts.spec import default_cost_per_1k
    from frugalserve.experts.transformers_engine import TransformersEngine

    tasks = T.generate("test", 9)
    rows = E.evaluate([(name, MODELS_DIR / name)], tasks, batch_size=9, progress=False)
    engine = TransformersEngine.from_path(MODELS_DIR / name, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=E.MAX_TOKENS, temperature=0.0)
    direct = asyncio.run(engine.generate([GenerationRequest(params=params, messages=t.messages) for t in tasks]))
    per_1k = default_cost_per_1k(engine.num_parameters)
    assert len(rows) == len(tasks)
    for row, task, c in zip(rows, tasks, direct):
        assert (row["id"], row["prompt"], row["reference"]) == (task.id, task.prompt, task.answer)
        assert row["answer"] == c.text
        assert row["token_logprobs"] == pytest.approx(list(c.token_logprobs), abs=1e-5)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (c.prompt_tokens, c.completion_tokens)
        assert row["correct"] == T.is_correct(c.text, task.answer)
        assert row["cost"] == pytest.approx((c.prompt_tokens + c.completion_tokens) / 1000 * per_1k)
        lps = list(c.token_logprobs)
        assert row["logprob_first"] == pytest.approx(lps[0], abs=1e-5)
        assert row["logprob_min"] == pytest.approx(min(lps), abs=1e-5)
        assert row["logprob_mean"] == pytest.approx(sum(lps) / len(lps), abs=1e-5)
        assert row["latency_s"] > 0


def test_command_line_writes_matrix_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert E.main(["--split", "test", "--limit", "6", "--experts", "tier-s", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(set(REQUIRED) <= set(r) for r in rows)
    assert [r["id"] for r in rows] == [t.id for t in T.generate("test", 6)]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["tier-s"]["n"] == 6
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| tier-s |" in capsys.readouterr().out


def test_summary_table_counts_by_expert_domain_and_difficulty():
    task = T.generate("test", 1)[0]
    rows = [E.make_row(task, "a", task.answer, [-0.1, -0.2], 10, 2, 0.5, 0.01, "stop"),
            E.make_row(task, "a", "wrong", [-3.0], 10, 1, 0.25, 0.01, "stop"),
            E.make_row(task, "b", task.answer, [], 10, 0, None, 0.02, "length")]
    s = E.summarize(rows)
    assert s["a"][task.domain] == 0.5 and s["a"][f"{task.domain}/{task.difficulty}"] == 0.5
    assert s["a"]["cost_per_1k_prompts"] == pytest.approx(375.0)
    assert s["b"]["all"] == 1.0 and rows[2]["logprob_mean"] is None
    table = E.format_table(s)
    assert table.splitlines()[0].startswith("| expert |") and "| a | " in table


def test_experts_are_named_by_zoo_name_path_or_both(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    got = E.parse_experts(f"tier-s,x={tmp_path / 'mine'},{tmp_path / 'mine'},builtin:tier-m")
    assert got == [("tier-s", MODELS_DIR / "tier-s"), ("x", tmp_path / "mine"),
                   ("mine", tmp_path / "mine"), ("tier-m", MODELS_DIR / "tier-m")]
    assert [n for n, _ in E.parse_experts(None)] == list(E.ZOO)


