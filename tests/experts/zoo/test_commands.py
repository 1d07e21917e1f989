"""`frugalserve demo-models` and `frugalserve finetune` end to end."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.transformers_engine import TransformersEngine
from safetensors.torch import load_file

from frugalserve.cli import main


def test_demo_models_rebuilds_the_committed_models(tmp_path):
    assert main(["demo-models", "--out", str(tmp_path)]) == 0
    for name in ("demo-llama", "demo-falcon"):  # seeded: the same weights, bit for bit
        built = load_file(tmp_path / name / "model.safetensors")
        shipped = load_file(MODELS_DIR / name / "model.safetensors")
        assert built.keys() == shipped.keys()
        assert all(torch.equal(built[k], shipped[k]) for k in built)
        assert (tmp_path / name / "tokenizer.json").read_text() == \
            (MODELS_DIR / name / "tokenizer.json").read_text()


def lora_b_norm(folder) -> float:
    weights = load_file(folder / "adapter_model.safetensors")
    return sum(float(v.float().norm()) for k, v in weights.items() if "lora_B" in k)


def test_finetune_lora_writes_an_adapter_the_engine_serves(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "adapter"
    assert main(["finetune", "--base", "builtin:demo-llama", "--domain", "arith", "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--no-quant", "--device", "cpu"]) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["steps"] == 3 and record["quantized_base"] == "none"
    assert json.loads(capsys.readouterr().out)["trainable_parameters"] == record["trainable_parameters"]
    assert lora_b_norm(out) > 0  # peft starts B at zero: training moved it
    engine = TransformersEngine.from_path(MODELS_DIR / "demo-llama", device="cpu", dtype="float32",
                                          adapters={"arith-lora": out})
    request = GenerationRequest(messages=({"role": "user", "content": "What is 2 + 3?"},),
                                params=SamplingParams(max_tokens=4), adapter="arith-lora")
    (c,) = asyncio.run(engine.generate([request]))
    assert c.completion_tokens >= 1


def test_finetune_qlora_on_the_readme_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert main(["finetune", "--base", "builtin:tier-m", "--domain", "arith", "--out", str(out),
                 "--steps", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["quantized_base"] == "nf4" and record["steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert lora_b_norm(out) > 0


def test_finetune_errors_name_the_problem(tmp_path, capsys):
    assert main(["finetune", "--base", "builtin:demo-llama", "--domain", "poetry", "--out",
                 str(tmp_path / "x"), "--steps", "1", "--no-quant", "--device", "cpu"]) == 2
    assert "unknown domain 'poetry'" in capsys.readouterr().err
    assert main(["finetune", "--base", str(tmp_path), "--domain", "arith", "--out",
                 str(tmp_path / "x"), "--steps", "1", "--device", "cpu"]) == 2
    assert "no Hugging Face model" in capsys.readouterr().err
