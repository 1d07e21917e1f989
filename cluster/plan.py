"""`frugalserve plan`: numbers every LLM developer should know, for one model and one GPU.

From a model config (a folder with a `config.json`, or a named shape), a weight dtype or 4/8-bit
quantization, a context length, concurrent sequences and GPU memory, it prints the weights, the KV
cache per token, how many tokens fit, and the replicas and GPUs needed, beside the same figures
with grouped-query (8 KV heads), multi-query (1 KV head), full multi-head attention and 4-bit
weights. `--json` prints the same as one object.

Everything is arithmetic on the config: parameters per matrix (checked against real checkpoints
in tests), KV bytes per token = layers × KV heads × head dim × 2 (K and V) × dtype bytes. The KV
cache stays in the compute dtype when the weights are quantized.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from frugalserve.experts.spec import MODELS_DIR

GB, GiB = 1e9, 2**30
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
QUANTS = ("none", "int8", "nf4")

# Published configs (Hugging Face config.json fields) of well-known models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                       num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                       vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(model_type="llama", num_hidden_layers=40, hidden_size=5120,
                        num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824,
                        vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192,
                        num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                        vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       vocab_size=128256, max_position_embeddings=8192),
    "llama-3-70b": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192,
                        num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                        vocab_size=128256, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", num_hidden_layers=32, hidden_size=4096,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       vocab_size=32000, max_position_embeddings=32768),
    "falcon-7b": dict(model_type="falcon", num_hidden_layers=32, hidden_size=4544,
                      num_attention_heads=71, multi_query=True, new_decoder_architecture=False,
                      parallel_attn=True, bias=False, vocab_size=65024,
                      max_position_embeddings=2048, tie_word_embeddings=True),
    "falcon-40b": dict(model_type="falcon", num_hidden_layers=60, hidden_size=8192,
                       num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True,
                       parallel_attn=True, bias=False, vocab_size=65024,
                       max_position_embeddings=2048, tie_word_embeddings=True),
}


class PlanError(ValueError):
    """Input the planner cannot use; the message names the value."""


@dataclass(frozen=True)
class Arch:
    """The parts of a config that decide memory."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_context: int
    falcon: dict | None = None  # Falcon's layout flags; None for Llama-style models

    def matrices(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer in the decoder stack (the quantizable weights)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.falcon is not None:
            per_layer = [(h, q + 2 * kv), (q, h), (h, self.intermediate), (self.intermediate, h)]
        else:
            per_layer = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, self.intermediate)] * 2 + [
                (self.intermediate, h)]
        return per_layer * self.layers

    def other_params(self) -> int:
        """Embeddings, lm head, norms and biases: kept in the compute dtype when quantized."""
        h, f = self.hidden, self.falcon
        params = self.vocab * h * (1 if self.tied else 2)
        if f is None:
            params += (2 * self.layers + 1) * h
            if self.model_type == "qwen2":  # q/k/v biases
                params += self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim
            return params
        norms_per_layer = 2 if (f["new_arch"] and f["num_ln"] == 2) or not f["parallel"] else 1
        params += (2 * norms_per_layer * self.layers + 2) * h  # LayerNorm: weight and bias
        if f["bias"]:
            params += sum(out for _, out in self.matrices())
        return params

    @property
    def num_parameters(self) -> int:
        return sum(i * o for i, o in self.matrices()) + self.other_params()

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * dtype_bytes


def arch_from_config(cfg: dict[str, Any]) -> Arch:
    def need(*keys):
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise PlanError(f"config has no {keys[0]!r}")

    layers = need("num_hidden_layers", "n_layer", "num_layers")
    heads = need("num_attention_heads", "n_head")
    hidden = need("hidden_size", "n_embd", "d_model")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = need("vocab_size")
    falcon = None
    if cfg.get("model_type") == "falcon":
        new_arch = bool(cfg.get("new_decoder_architecture", False))
        mq = bool(cfg.get("multi_query", True))
        kv = int(cfg.get("num_kv_heads") or heads) if (new_arch or not mq) else 1
        falcon = {"new_arch": new_arch, "parallel": bool(cfg.get("parallel_attn", True)),
                  "bias": bool(cfg.get("bias", False)),
                  "num_ln": int(cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1))}
        inter = int(cfg.get("ffn_hidden_size") or 4 * hidden)
        tied = bool(cfg.get("tie_word_embeddings", True))
    else:
        kv = int(cfg.get("num_key_value_heads") or heads)
        inter = need("intermediate_size")
        tied = bool(cfg.get("tie_word_embeddings", False))
    if kv < 1 or heads % kv:
        raise PlanError(f"num_attention_heads {heads} is not a multiple of KV heads {kv}")
    return Arch(str(cfg.get("model_type", "llama")), layers, hidden, heads, kv, head_dim, inter,
                vocab, tied, int(cfg.get("max_position_embeddings") or 2048), falcon)


def weight_bytes(arch: Arch, dtype_bytes: int, quant: str) -> int:
    """Weights as stored. int8 (LLM.int8): 1 byte per linear weight + an fp32 scale per output
    row. nf4 (QLoRA, double quantization): 4 bits + an 8-bit absmax per 64 weights + an fp32
    scale per 256 absmax ≈ 4.127 bits. Embeddings, lm head and norms stay in the compute dtype."""
    other = arch.other_params() * dtype_bytes
    mats = arch.matrices()
    if quant == "none":
        return other + sum(i * o for i, o in mats) * dtype_bytes
    if quant == "int8":
        return other + sum(i * o + 4 * o for i, o in mats)
    if quant == "nf4":
        n = sum(i * o for i, o in mats)
        return other + math.ceil(n / 2 + n / 64 + 4 * n / (64 * 256))
    raise PlanError(f"unknown quantization {quant!r}; choose from {QUANTS}")


@dataclass(frozen=True)
class Row:
    """One variant's figures."""

    variant: str
    kv_heads: int
    weight_bytes: int
    kv_bytes_per_token: int
    gpus_per_replica: int
    tokens_per_replica: int
    sequences_per_replica: int
    replicas: int
    gpus: int


def plan_row(arch: Arch, variant: str, *, dtype: str, quant: str, context: int,
             concurrency: int, gpu_bytes: float, fraction: float) -> Row:
    dtype_bytes = DTYPE_BYTES[dtype]
    weights = weight_bytes(arch, dtype_bytes, quant)
    kv = arch.kv_bytes_per_token(dtype_bytes)
    tp = 1  # tensor-parallel GPUs per replica: the fewest (power of two) that hold one sequence
    while tp * gpu_bytes * fraction - weights < kv * context:
        tp *= 2
        if tp > 64:
            raise PlanError(f"{variant}: weights ({weights / GB:.1f} GB) plus one {context}-token "
                            f"sequence do not fit on 64 GPUs of {gpu_bytes / GiB:g} GiB")
    tokens = int((tp * gpu_bytes * fraction - weights) // kv)
    seqs = tokens // context
    replicas = math.ceil(concurrency / seqs)
    return Row(variant, arch.kv_heads, weights, kv, tp, tokens, seqs, replicas, replicas * tp)


def variants(arch: Arch, quant: str) -> list[tuple[str, Arch, str]]:
    """The model as configured, then what GQA/MQA/MHA and 4-bit weights would change."""
    out = [("as configured", arch, quant)]
    if arch.kv_heads != arch.heads:
        out.append((f"MHA ({arch.heads} KV heads)", replace(arch, kv_heads=arch.heads), quant))
    if arch.kv_heads != 8 and arch.heads % 8 == 0 and arch.heads > 8:
        out.append(("GQA (8 KV heads)", replace(arch, kv_heads=8), quant))
    if arch.kv_heads != 1:
        out.append(("MQA (1 KV head)", replace(arch, kv_heads=1), quant))
    if quant != "nf4":
        out.append(("nf4 weights", arch, "nf4"))
    return out


def load_config(model: str | None, shape: str | None) -> tuple[str, dict[str, Any]]:
    if (model is None) == (shape is None):
        raise PlanError("give exactly one of --model DIR or --shape NAME")
    if model is not None:
        path = Path(model).expanduser()
        if model.startswith("builtin:"):
            return model, _zoo().get(model.removeprefix("builtin:")) or _unknown_shape(model)
        if not (path / "config.json").is_file():
            raise PlanError(f"--model {model!r}: no config.json in that folder")
        try:
            return path.name, json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"--model {model!r}: config.json is not valid JSON ({exc})") from None
    assert shape is not None
    name = shape.removeprefix("builtin:")
    cfg = SHAPES.get(name) or _zoo().get(name)
    return name, cfg if cfg is not None else _unknown_shape(shape)


def _zoo() -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(MODELS_DIR.glob("*/config.json"))}


def _unknown_shape(name: str):
    raise PlanError(f"unknown shape {name!r}; known: {sorted(SHAPES) + sorted(_zoo())}")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="frugalserve plan", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder (only config.json is read), or builtin:NAME")
    src.add_argument("--shape", help=f"a named shape: {', '.join(SHAPES)}, or a zoo model")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16",
                   help="compute dtype: weights (unless quantized) and KV cache")
    p.add_argument("--quant", choices=QUANTS, default="none", help="weight quantization")
    p.add_argument("--context", type=_positive(int), help="tokens per sequence (default: model's)")
    p.add_argument("--concurrency", type=_positive(int), default=1, help="concurrent sequences")
    p.add_argument("--gpu-memory-gib", type=_positive(float), default=80.0, help="memory per GPU")
    p.add_argument("--memory-fraction", type=_fraction, default=0.9,
                   help="share of GPU memory for weights + KV cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def plan(args: argparse.Namespace) -> dict[str, Any]:
    name, cfg = load_config(args.model, args.shape)
    arch = arch_from_config(cfg)
    context = args.context or arch.max_context
    kw = dict(dtype=args.dtype, context=context, concurrency=args.concurrency,
              gpu_bytes=args.gpu_memory_gib * GiB, fraction=args.memory_fraction)
    rows = [plan_row(a, v, quant=q, **kw) for v, a, q in variants(arch, args.quant)]
    first = rows[0]
    return {
        "model": name, "model_type": arch.model_type, "dtype": args.dtype, "quant": args.quant,
        "num_parameters": arch.num_parameters, "num_layers": arch.layers,
        "num_attention_heads": arch.heads, "num_kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim, "context": context, "concurrency": args.concurrency,
        "gpu_memory_bytes": int(kw["gpu_bytes"]), "memory_fraction": args.memory_fraction,
        "weight_bytes": first.weight_bytes, "kv_bytes_per_token": first.kv_bytes_per_token,
        "kv_bytes_per_sequence": first.kv_bytes_per_token * context,
        "gpus_per_replica": first.gpus_per_replica, "tokens_per_replica": first.tokens_per_replica,
        "sequences_per_replica": first.sequences_per_replica, "replicas": first.replicas,
        "gpus": first.gpus, "variants": [asdict(r) for r in rows],
    }


def render(p: dict[str, Any]) -> str:
    gpu = p["gpu_memory_bytes"] / GiB
    lines = [
        f"{p['model']} ({p['model_type']}): {p['num_parameters'] / 1e9:.2f} B parameters, "
        f"{p['num_layers']} layers, {p['num_attention_heads']} heads, {p['num_kv_heads']} KV heads "
        f"of {p['head_dim']}",
        f"{p['dtype']}, weights {p['quant']}; {p['concurrency']} sequences of {p['context']} "
        f"tokens; GPUs of {gpu:g} GiB × {p['memory_fraction']:g}",
        "",
        f"weights             {p['weight_bytes'] / GB:10.2f} GB",
        f"KV cache per token  {p['kv_bytes_per_token'] / 1e6:10.4f} MB  "
        f"({p['num_layers']} layers × {p['num_kv_heads']} KV heads × {p['head_dim']} × 2 × "
        f"{DTYPE_BYTES[p['dtype']]} B)",
        f"KV per sequence     {p['kv_bytes_per_sequence'] / GB:10.3f} GB  at {p['context']} tokens",
        f"tokens that fit     {p['tokens_per_replica']:10d}     per replica "
        f"({p['gpus_per_replica']} GPU{'s' if p['gpus_per_replica'] > 1 else ''})",
        f"replicas / GPUs     {p['replicas']:10d} / {p['gpus']}",
        "",
    ]
    head = ("variant", "KV heads", "weights GB", "KV/token MB", "tokens/replica",
            "seqs/replica", "GPUs/replica", "replicas", "GPUs")
    table = [head] + [(
        r["variant"], str(r["kv_heads"]), f"{r['weight_bytes'] / GB:.2f}",
        f"{r['kv_bytes_per_token'] / 1e6:.4f}", str(r["tokens_per_replica"]),
        str(r["sequences_per_replica"]), str(r["gpus_per_replica"]), str(r["replicas"]),
        str(r["gpus"])) for r in p["variants"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = plan(args)
    except PlanError as exc:
        print(f"frugalserve plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
