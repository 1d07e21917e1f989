"""`frugalserve plan` against figures known from the literature and from real checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from frugalserve.cluster.plan import SHAPES, arch_from_config, main
from frugalserve.experts.spec import MODELS_DIR

from frugalserve.cli import main as cli


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_llama_2_13b_fp16_known_figures(capsys):
    p = run_json(capsys, "--shape", "llama-2-13b", "--dtype", "float16")
    assert p["kv_bytes_per_token"] == 40 * 40 * 128 * 2 * 2 == 819_200  # ~0.8 MB
    assert p["weight_bytes"] == pytest.approx(26.0e9, rel=0.01)  # ~26 GB
    assert p["num_parameters"] == pytest.approx(13.0e9, rel=0.01)


@pytest.mark.parametrize("shape, billions", [("llama-2-7b", 6.74), ("llama-2-70b", 68.98),
                                             ("llama-3-8b", 8.03), ("mistral-7b", 7.24),
                                             ("falcon-7b", 6.92)])
def test_parameter_counts_match_published(shape, billions):
    assert arch_from_config(SHAPES[shape]).num_parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_gqa_8_kv_heads_of_64_cuts_kv_8x(capsys):
    p = run_json(capsys, "--shape", "llama-2-70b", "--context", "4096", "--concurrency", "64")
    mha = next(v for v in p["variants"] if v["variant"].startswith("MHA"))
    assert p["num_kv_heads"] == 8 and mha["kv_heads"] == 64
    assert mha["kv_bytes_per_token"] == 8 * p["kv_bytes_per_token"]
    assert mha["gpus"] > p["gpus"]  # 20 GPUs (4 per replica) against 12 (2 per replica)


def test_mqa_and_4bit(capsys):
    p = run_json(capsys, "--shape", "falcon-7b")
    assert p["num_kv_heads"] == 1 and p["kv_bytes_per_token"] == 32 * 64 * 2 * 2
    nf4 = next(v for v in p["variants"] if v["variant"] == "nf4 weights")
    assert nf4["weight_bytes"] < 0.32 * p["weight_bytes"]  # ~4.1 bits for the linear layers
    assert nf4["kv_bytes_per_token"] == p["kv_bytes_per_token"]  # KV stays in fp16
    q8 = run_json(capsys, "--shape", "falcon-7b", "--quant", "int8")
    assert 0.5 < q8["weight_bytes"] / p["weight_bytes"] < 0.56


def test_replicas_and_gpus(capsys):
    # 80 GiB × 0.9 − 26 GB leaves ~51.3 GB: 62,594 tokens, 15 sequences of 4k; 32 need 3 replicas
    p = run_json(capsys, "--shape", "llama-2-13b", "--context", "4096", "--concurrency", "32")
    assert (p["tokens_per_replica"], p["sequences_per_replica"]) == (62594, 15)
    assert (p["replicas"], p["gpus"]) == (3, 3)
    big = run_json(capsys, "--shape", "llama-3-70b", "--dtype", "bfloat16", "--gpu-memory-gib", "40")
    assert big["gpus_per_replica"] == 4 and big["gpus"] == 4  # 141 GB of weights: tensor parallel


def _safetensors_numel(path: Path) -> int:
    with path.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in MODELS_DIR.glob("*/model.safetensors")))
def test_parameter_formula_matches_real_checkpoints(folder):
    cfg = json.loads((MODELS_DIR / folder / "config.json").read_text())
    assert arch_from_config(cfg).num_parameters == _safetensors_numel(
        MODELS_DIR / folder / "model.safetensors")


def test_model_folder_with_only_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["mistral-7b"]))
    assert cli(["plan", "--model", str(tmp_path), "--dtype", "float16", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kv_bytes_per_token"] == 32 * 8 * 128 * 2 * 2 and p["context"] == 32768


def test_table_output(capsys):
    assert main(["--shape", "builtin:demo-falcon", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token" in out and "as configured" in out and "nf4 weights" in out
    assert "2 layers × 2 KV heads × 8 × 2 × 4 B" in out


@pytest.mark.parametrize("argv, named", [
    (["--shape", "llama-9000"], "'llama-9000'"),
    (["--model", "/no/such/dir"], "'/no/such/dir'"),
])
def test_bad_model_names_the_value(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err


@pytest.mark.parametrize("argv, named", [
    (["--shape", "llama-3-8b", "--dtype", "float8"], "'float8'"),
    (["--shape", "llama-3-8b", "--memory-fraction", "1.5"], "'1.5'"),
    (["--shape", "llama-3-8b", "--context", "0"], "'0'"),
    (["--shape", "llama-3-8b", "--concurrency", "many"], "'many'"),
])
def test_bad_options_name_the_value(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_does_not_fit_is_an_error(capsys):
    assert main(["--shape", "llama-3-70b", "--gpu-memory-gib", "0.5"]) == 2
    assert "do not fit" in capsys.readouterr().err
