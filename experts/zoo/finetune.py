"""`frugalserve finetune`: QLoRA — a 4-bit (NF4) base from the zoo plus LoRA adapters (peft),
trained on one domain of the task suite; writes a standard peft adapter folder.

    frugalserve finetune --base builtin:tier-s --domain arith --out adapters/tier-s-arith \\
        --steps 300 [--max-minutes 5] [--device cuda]

The paged AdamW of bitsandbytes is used where it exists (CUDA); elsewhere torch's AdamW. Seeded;
a progress bar shows the loss. `--no-quant` trains LoRA on the unquantized base (plain LoRA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from frugalserve.experts.quant import quantization_config
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import pick_device
from frugalserve.experts.zoo import tasks as T
from frugalserve.experts.zoo.data import Batches, build_pools
from tqdm import tqdm
from transformers import AutoModelForCausalLM

LORA_TARGETS = {  # module names per architecture
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def load_base(path: Path, device: str, quantize: bool):
    kwargs: dict = {}
    if quantize:
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = quantization_config("nf4", True, compute)
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = model.to(torch.device(device))  # type: ignore[arg-type]  # transformers' wrapped .to
    return model


def add_lora(model, rank: int, alpha: int, dropout: float, quantized: bool):
    # peft (the quant extra): only training needs it; the module imports without it
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = LORA_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ValueError(f"no LoRA target modules known for model type {model.config.model_type!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_optimizer(params, lr: float, device: str):
    """Paged AdamW (bitsandbytes) on CUDA, where paging spills optimizer state under memory
    pressure; torch's AdamW elsewhere. Returns (optimizer, its name)."""
    if device == "cuda":
        try:
            import bitsandbytes as bnb  # the quant extra, optional: torch's AdamW otherwise

            return bnb.optim.PagedAdamW(params, lr=lr), "bitsandbytes.PagedAdamW"
        except Exception:  # noqa: BLE001 - fall back to the plain optimizer, say so
            pass
    return torch.optim.AdamW(params, lr=lr), "torch.AdamW"


def finetune(base: Path, domain: str, out: Path, *, steps: int, batch_size: int, lr: float,
             rank: int, device: str, quantize: bool, seed: int, max_minutes: float | None,
             pool_size: int = 20_000) -> dict:
    if domain not in T.DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(T.DOMAINS)}")
    torch.manual_seed(seed)
    model = load_base(base, device, quantize)
    model = add_lora(model, rank, 2 * rank, 0.05, quantize)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    pools = build_pools(base, (domain,), pool_size, seed, 96, procs=1)  # the base's tokenizer; room for any
    batches = Batches(pools, (domain,), batch_size, device, seed)
    opt, opt_name = make_optimizer(trainable, lr, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    deadline = time.time() + 60 * max_minutes if max_minutes else None
    t0, running, step = time.time(), None, 0
    model.train()
    with tqdm(total=steps, desc=f"QLoRA {base.name}/{domain}", unit="step") as bar:
        while step < steps and (deadline is None or time.time() < deadline):
            x, y, mask = batches.next()
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
            loss = (nll * mask).sum() / mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            bar.update(1)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record = {
        "base": str(base), "domain": domain, "quantized_base": "nf4" if quantize else "none",
        "rank": rank, "steps": step, "planned_steps": steps, "batch_size": batch_size,
        "lr": lr, "seed": seed, "optimizer": opt_name, "device": device,
        "trainable_parameters": n_train, "seconds": round(time.time() - t0, 1),
        "final_loss": running,
        "adapter_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }
    if device == "cuda":
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    (out / "finetune.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="frugalserve finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="builtin:tier-s", help="base model folder or builtin:NAME")
    p.add_argument("--domain", required=True, help="arith | text | facts")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-quant", action="store_true", help="LoRA on the unquantized base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    args = p.parse_args(argv)
    try:
        base = resolve_model_path(args.base)
        if not (base / "config.json").is_file():
            raise ValueError(f"--base {args.base!r}: no Hugging Face model at {base}")
        record = finetune(base, args.domain, args.out, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                          device=pick_device(args.device).type, quantize=not args.no_quant,
                          seed=args.seed, max_minutes=args.max_minutes)
    except ValueError as exc:
        print(f"frugalserve finetune: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0
