"""The demo expert zoo: the training script runs, and the committed models are what docs/zoo.md
says they are (thresholds from the numbers measured on this slice, with a margin)."""

from __future__ import annotations

import json
import re

import pytest
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.zoo import cli, data, train
from frugalserve.experts.zoo import tasks as T

MODELS = MODELS_DIR
TIERS = ("tier-s", "tier-m", "tier-l")
EXPERTS = {"expert-arith": "arith", "expert-text": "text", "expert-facts": "facts"}
GENERALIST = "generalist-1.5m"  # the generalist of the experts' size
COMMITTED = (*TIERS, *EXPERTS, GENERALIST)
_FACT = r"(?:[A-Z][a-z]+|\d{4}|[a-z]+)"
FORMATS = {"arith": r"-?\d+", "text": r"[a-zA-Z0-9]+", "facts": rf"{_FACT}(?:, {_FACT})?"}  # a pair: "Kraml, 1523"
SLICE = 300  # the first 300 prompts of the test split: 100 per domain, 33-34 per difficulty

TINY = {"arch": "llama", "domains": ["arith", "text"], "hidden": 32, "layers": 1, "heads": 2,
        "kv_heads": 1, "ffn": 64, "steps": 4, "batch_size": 8, "lr": 1e-3, "min_lr_ratio": 0.1,
        "warmup": 2, "weight_decay": 0.0}


# -- the training script (CPU smoke tests) -----------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "falcon-alibi"])
def test_training_a_tiny_model_saves_a_loadable_hf_model(tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = data.load_tokenizer()
    pools = data.build_pools(data.TOKENIZER_DIR, ["arith", "text"], 64, 0, 52, procs=1)
    settings = {**TINY, "arch": arch, "name": f"tiny-{arch}"}
    record = train.train_model(settings, pools, tok, tmp_path, "cpu", None, seed=0, eval_per_domain=1)
    assert record["steps"] == 4 and record["final_loss"] > 0
    assert set(record["heldout_accuracy"]) >= {"arith", "text"}  # the held-out family is scored too
    assert record["step_fits"] == []  # no time limit: the schedule ran as configured
    path = tmp_path / f"tiny-{arch}"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16  # stored in bf16 to keep the zoo small
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert json.loads((path / "training.json").read_text())["steps"] == 4
    if arch == "falcon-alibi":
        assert model.config.alibi and model.config.num_kv_heads < model.config.num_attention_heads


def test_an_example_longer_than_max_len_is_an_error_not_cut():
    with pytest.raises(ValueError, match="over max_len 12: raise `max_len`"):
        data.build_pools(data.TOKENIZER_DIR, ["text"], 8, 0, 12, procs=1)


def test_a_model_can_fit_its_steps_without_the_command_line_flag():
    import argparse

    args = argparse.Namespace(steps=None, batch_size=None, fit_steps=False)
    own, other = {"fit_steps": True, "warmup": 10}, {"warmup": 10}
    train.override(own, args)
    train.override(other, args)
    assert own["fit_steps"] and not other["fit_steps"]
    train.override(other, argparse.Namespace(steps=None, batch_size=None, fit_steps=True))
    assert other["fit_steps"]


def test_training_is_seeded(tmp_path):
    tok = data.load_tokenizer()
    pools = data.build_pools(data.TOKENIZER_DIR, ["arith", "text"], 64, 0, 52, procs=1)
    weights = []
    for run in ("a", "b"):
        train.train_model({**TINY, "name": run}, pools, tok, tmp_path, "cpu", None, seed=0)
        weights.append((tmp_path / run / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_zoo_train_command_line(tmp_path, capsys):
    config = tmp_path / "zoo.yaml"
    config.write_text(json.dumps({
        "seed": 0, "tokenizer": "experts/zoo/models/tokenizer",
        "train": {**{k: v for k, v in TINY.items() if k not in ("arch", "domains")}, "max_len": 40,
                  "pool_per_domain": 64, "eval_per_domain": 2},
        "models": {"tiny": {"arch": "llama", "domains": ["facts"], "hidden": 32, "layers": 1,
                            "heads": 2, "kv_heads": 1, "ffn": 64}},
    }))
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "tiny" / "config.json").is_file()
    assert "tiny" in capsys.readouterr().out


def test_alibi_experiment_runs_end_to_end(tmp_path):
    from frugalserve.experts.zoo import alibi_experiment as A

    config = tmp_path / "zoo.yaml"
    twin = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 2, "ffn": 96}
    config.write_text(json.dumps({
        "seed": 0, "tokenizer": "experts/zoo/models/tokenizer",
        "train": {**{k: v for k, v in TINY.items() if k not in ("arch", "domains")}, "max_len": 40},
        "alibi": {"max_len": 24, "factors": [1, 2], "pool_per_domain": 64, "eval_windows": 4,
                  "eval_prompts": 6, "models": {"a": {"arch": "falcon-alibi", **twin},
                                                "r": {"arch": "llama", **twin, "ffn": 64}}},
    }))
    results, png = tmp_path / "alibi.json", tmp_path / "alibi.png"
    assert A.main(["--config", str(config), "--device", "cpu", "--results", str(results),
                   "--plot", str(png), "--procs", "1"]) == 0
    rows = json.loads(results.read_text())
    assert [r["name"] for r in rows] == ["a", "r"]
    assert [x["context"] for x in rows[0]["long_context"]] == [24, 48]
    assert png.stat().st_size > 0


# -- the committed zoo -------------------------------------------------------------------------


def test_zoo_fits_its_size_budget():
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total <= 100e6  # every committed model folder, the router and the tokenizer


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_loads_standalone_and_answers_in_format(name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = MODELS / name
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    size = sum(p.numel() for p in model.parameters())
    expected = {"tier-s": 0.5e6, "tier-m": 2.5e6, "tier-l": 23e6}.get(name, 1.5e6)
    assert 0.8 * expected <= size <= 1.2 * expected
    if name in EXPERTS:
        domains = [EXPERTS[name]]
    else:
        domains = list(T.DOMAINS)
        assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    for task in T.generate("test", len(domains), domains=tuple(domains)):
        text = tok.apply_chat_template(list(task.messages), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert out[0, -1].item() == tok.eos_token_id, (name, task.prompt, answer)  # ends its turn
        assert re.fullmatch(FORMATS[task.domain], answer.strip()), (name, task.prompt, answer)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_answers_its_domains_in_format(matrix, name):
    domains = [EXPERTS[name]] if name in EXPERTS else list(T.DOMAINS)
    rows = [r for r in matrix if r["expert"] == name and r["domain"] in domains]
    in_format = [bool(re.fullmatch(FORMATS[r["domain"]], r["answer"].strip())) for r in rows]
    assert sum(in_format) >= 0.97 * len(rows)
    assert all(r["finish_reason"] == "stop" for r in rows)  # every answer ends with <|end|>


def test_one_falcon_expert_uses_alibi_with_grouped_kv_heads():
    from transformers import AutoConfig

    configs = [AutoConfig.from_pretrained(MODELS / n) for n in EXPERTS]
    assert any(c.model_type == "falcon" and c.alibi and c.new_decoder_architecture
               and c.num_kv_heads < c.num_attention_heads for c in configs)


@pytest.fixture(scope="module")
def matrix():
    """The response matrix of the committed models on the fixed slice (the evaluation harness)."""
    from frugalserve.experts.zoo.evaluate import evaluate

    return evaluate([(n, MODELS / n) for n in COMMITTED], T.generate("test", SLICE), batch_size=100,
                    progress=False)


@pytest.fixture(scope="module")
def accuracy(matrix):
    """Accuracy by (expert, domain), (expert, "all") and (expert, "domain/difficulty")."""
    table: dict[tuple[str, str], list[bool]] = {}
    for r in matrix:
        for key in ((r["expert"], r["domain"]), (r["expert"], "all"),
                    (r["expert"], f"{r['domain']}/{r['difficulty']}")):
            table.setdefault(key, []).append(r["correct"])
    return {k: sum(v) / len(v) for k, v in table.items()}


# Measured on this slice (fp32, CPU): all-domain accuracy tier-s 0.570, tier-m 0.807,
# tier-l 0.960; on their domains expert-arith 0.76, expert-text 0.99, expert-facts 1.00 against
# generalist-1.5m 0.53, 0.96, 0.91; off their domains the experts score <= 0.01.


def test_tiers_are_good_generalists(accuracy):
    floors = {"tier-s": 0.50, "tier-m": 0.74, "tier-l": 0.93}  # measured 0.570, 0.807, 0.960
    for tier, floor in floors.items():
        assert accuracy[(tier, "all")] >= floor, tier


def test_tier_m_beats_tier_s_above_all_on_hard_items(accuracy):
    assert accuracy[("tier-m", "all")] >= accuracy[("tier-s", "all")] + 0.10  # measured +0.237
    assert accuracy[("tier-m", "arith/3")] > accuracy[("tier-s", "arith/3")]
    assert accuracy[("tier-m", "text/3")] > accuracy[("tier-s", "text/3")]


def test_tier_l_beats_tier_m_by_three_points_and_on_every_domain(accuracy):
    assert accuracy[("tier-l", "all")] >= accuracy[("tier-m", "all")] + 0.03  # measured +0.153
    for domain in T.DOMAINS:
        assert accuracy[("tier-l", domain)] >= accuracy[("tier-m", domain)], domain
    assert accuracy[("tier-l", "arith/3")] > accuracy[("tier-m", "arith/3")]  # 0.82 vs 0.09


@pytest.mark.parametrize("expert,domain", [("expert-arith", "arith"), ("expert-facts", "facts")])
def test_domain_expert_beats_the_generalist_of_its_size_by_five_points(accuracy, expert, domain):
    assert accuracy[(expert, domain)] >= accuracy[(GENERALIST, domain)] + 0.05  # +0.23, +0.09


def test_text_expert_beats_the_generalist_of_its_size(accuracy):
    assert accuracy[("expert-text", "text")] > accuracy[(GENERALIST, "text")]  # 0.99 vs 0.96


@pytest.mark.xfail(strict=True, reason="the text expert wins, but by less than five points: on "
                   "this slice 0.99 vs 0.96; on the full 900-prompt test split 99.7 vs 95.7 %")
def test_text_expert_beats_the_generalist_of_its_size_by_five_points(accuracy):
    assert accuracy[("expert-text", "text")] >= accuracy[(GENERALIST, "text")] + 0.05


@pytest.mark.parametrize("expert", list(EXPERTS))
def test_domain_expert_does_poorly_off_its_domain(accuracy, expert):
    for domain in T.DOMAINS:
        if domain != EXPERTS[expert]:
            assert accuracy[(expert, domain)] <= 0.05, domain  # measured <= 0.01
    assert accuracy[(expert, EXPERTS[expert])] >= 0.65  # measured >= 0.76


def test_tiers_generalise_to_the_heldout_phrasings():
    """The first 90 prompts of the held-out family, phrasings no model was trained on."""
    from frugalserve.experts.zoo.evaluate import evaluate

    rows = evaluate([(n, MODELS / n) for n in TIERS], T.generate("heldout", 90), batch_size=90,
                    progress=False)
    acc = {n: sum(r["correct"] for r in rows if r["expert"] == n) / 90 for n in TIERS}
    assert acc["tier-s"] < acc["tier-m"] < acc["tier-l"], acc  # measured 0.34, 0.51, 0.63
    assert acc["tier-l"] >= 0.55, acc
