"""Train the demo expert zoo: `frugalserve zoo train [--config configs/zoo.yaml] ...`.

Every model is a small Hugging Face causal LM (Llama with grouped-query attention, or Falcon
with ALiBi and grouped KV heads) trained from scratch on the task suite (`tasks.py`) in chat
format, the loss on the answer tokens only. Training examples come from the token pools of
`data.py`. Seeded; bf16 autocast on GPU, float32 on CPU. Several models train at once in separate
processes (`--jobs`): tiny models are bound by kernel launches, not by the GPU.

Each model runs the step count of its config entry (`--steps` overrides all). `--max-minutes`
is a hard time limit; with `--fit-steps` each model instead measures its step rate and lowers
its step count so that its cosine schedule ends on time. On one shared GPU that gives cheap
models more steps than expensive ones, so equal step counts are the fair default. The steps
actually run are written to the model folder's `training.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.transformers_engine import pick_device
from frugalserve.experts.zoo import tasks as T
from frugalserve.experts.zoo.data import (
    TOKENIZER_DIR,
    Batches,
    build_pools,
    chat_text,
    load_tokenizer,
)
from tqdm import tqdm
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "zoo.yaml"


# -- config ------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None) -> dict:
    path = Path(path) if path else DEFAULT_CONFIG
    with open(path) as f:
        return yaml.safe_load(f)


def config_path(cfg: dict, key: str, default: Path) -> Path:
    """A folder the config names relative to the repository root, or `default`."""
    return REPO_ROOT / cfg[key] if key in cfg else default


def model_settings(cfg: dict, name: str, section: str = "models") -> dict:
    """A model's settings: the `train` defaults overlaid with the model's own entry."""
    if name not in cfg[section]:
        raise KeyError(f"no model {name!r} in the config's {section!r}; have {sorted(cfg[section])}")
    return {**cfg["train"], **cfg[section][name], "name": name}


# -- models ------------------------------------------------------------------------------------


def build_model(s: dict, tok, seed: int):
    """A fresh model from a config entry: `arch` llama | falcon-alibi | falcon-rope."""
    common = dict(
        vocab_size=len(tok),
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=s.get("max_position_embeddings", 1024),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if s["arch"] == "llama":
        return LlamaForCausalLM(LlamaConfig(
            intermediate_size=s["ffn"], num_key_value_heads=s["kv_heads"], **common
        ))
    if s["arch"] in ("falcon-alibi", "falcon-rope"):
        return FalconForCausalLM(FalconConfig(
            ffn_hidden_size=s["ffn"], num_kv_heads=s["kv_heads"], new_decoder_architecture=True,
            alibi=s["arch"] == "falcon-alibi", parallel_attn=True, bias=False, **common,
        ))
    raise ValueError(f"unknown arch {s['arch']!r} for {s['name']!r}: llama | falcon-alibi | falcon-rope")


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, total: int, s: dict) -> float:
    """Linear warm-up, then cosine down to `min_lr_ratio` of the peak at `total` steps."""
    peak, warm = float(s["lr"]), int(s["warmup"])
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = float(s["min_lr_ratio"])
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, next_batch, s: dict, device: str, *, deadline: float | None, log=None,
               desc: str = "", loss_fn=None) -> dict:
    """Train `model` for `s['steps']` AdamW steps; stop early at `deadline` (a safety net: the
    schedule then does not finish). With `s['fit_steps']`, lower the step count from the
    measured step rate so that the schedule ends by the deadline.

    `next_batch()` gives (inputs, targets, mask); the loss is the mean cross-entropy over the
    masked target positions. Returns what happened (steps, losses, seconds).
    """

    cuda = device == "cuda"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(s["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(s["lr"]), betas=(0.9, 0.98), eps=1e-8, fused=cuda,
    )
    total = int(s["steps"])
    probe_every = int(s.get("refit_every", 500))
    fit = bool(s.get("fit_steps")) and deadline is not None
    bar = tqdm(total=total, desc=desc, file=log or sys.stderr, mininterval=1 if log is None else 15,
               dynamic_ncols=log is None, ascii=log is not None)
    losses, t0, mark = [], time.time(), (0, time.time())
    running = None
    step = 0
    fits: list[tuple[int, int]] = []
    model.train()
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, s)
        inputs, targets, mask = next_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=inputs).logits
        logp = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view_as(targets)
        loss = (logp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == total:
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            losses.append((step, round(value, 4)))
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{group['lr']:.1e}", refresh=False)
        bar.update(1)
        if fit and deadline is not None and (step in (100, 300) or step % probe_every == 0):
            now = time.time()
            rate = (step - mark[0]) / max(1e-6, now - mark[1])
            fitted = step + int(rate * max(0.0, deadline - now) * 0.97)
            if step >= 100:
                refit = max(step + 1, min(int(s["steps"]), fitted))
                if refit != total:
                    fits.append((step, refit))  # the schedule that ran: total from this step on
                total = refit
                bar.total = total
            mark = (step, now)
        if deadline is not None and time.time() > deadline:
            print(f"{desc}: stopped by the time limit at step {step} of {total}", file=log or sys.stderr)
            break
    bar.close()
    model.eval()
    return {"steps": step, "planned_steps": total, "seconds": round(time.time() - t0, 1), "final_loss": running,
            "step_fits": fits, "losses": losses}


# -- greedy decoding (for the training-time evaluation) ---------------------------------------


def greedy(model, tok, prompts: list[list[int]], max_new: int = 16, batch_size: int = 256) -> list[str]:
    """Batched greedy decoding without a cache: left padding, explicit positions. Simple and
    model-agnostic; the evaluation harness uses the serving engine instead."""

    device = next(model.parameters()).device
    end, pad = tok.convert_tokens_to_ids("<|end|>"), tok.pad_token_id
    out: list[str] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        new = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for _ in range(max_new):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                new.append(nxt)
                done |= nxt == end
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, (~done | (nxt == end)).long()[:, None]], 1)
                if bool(done.all()):
                    break
        for row in torch.stack(new, 1).tolist():
            row = row[: row.index(end)] if end in row else row
            out.append(tok.decode([t for t in row if t != pad], skip_special_tokens=True))
    return out


def quick_eval(model, tok, n_per_domain: int, seed: int = 0, split: str = "test") -> dict:
    """Accuracy by domain and difficulty on the first items of `split` (the model's domains)."""
    tasks_ = T.generate(split, 3 * n_per_domain, seed=seed)
    prompts = [tok(chat_text(t.prompt), add_special_tokens=False)["input_ids"] for t in tasks_]
    answers = greedy(model, tok, prompts)
    table: dict[str, list[int]] = {}
    for t, a in zip(tasks_, answers):
        ok = int(T.is_correct(a, t.answer))
        for key in (t.domain, f"{t.domain}/{t.difficulty}"):
            table.setdefault(key, []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(table.items())}


# -- one model ---------------------------------------------------------------------------------


def save_model(model, tok, path: Path, meta: dict) -> None:
    if path.exists():
        shutil.rmtree(path)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_new_tokens=16, do_sample=False,
    )
    model.save_pretrained(path, max_shard_size="15MB")
    tok.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def train_model(s: dict, pools: dict, tok, out: Path, device: str, deadline: float | None,
                seed: int, log=None, eval_per_domain: int = 0) -> dict:
    """Train, evaluate (optionally) and save one zoo model; returns its record."""
    device = pick_device(device).type
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(s, tok, seed).to(device)
    batches = Batches(pools, s["domains"], int(s["batch_size"]), device, seed)
    record = {"name": s["name"], "arch": s["arch"], "domains": list(s["domains"]),
              "params": num_params(model), "device": device, "seed": seed}
    record.update(train_loop(model, batches.next, s, device, deadline=deadline, log=log, desc=s["name"]))
    if eval_per_domain:
        record["test_accuracy"] = quick_eval(model, tok, eval_per_domain)
        # the held-out phrasing family, a third as many prompts
        record["heldout_accuracy"] = quick_eval(model, tok, max(1, eval_per_domain // 3),
                                                split=T.HELDOUT)
    settings = {k: v for k, v in s.items() if k != "name"}
    save_model(model, tok, out / s["name"], {**{k: v for k, v in record.items() if k != "losses"},
                                              "settings": settings, "losses": record["losses"]})
    return record


def _worker(name: str, s: dict, pool_file: str, tok_dir: str, out: str, device: str,
            deadline: float | None, seed: int, log_dir: str, eval_per_domain: int, barrier) -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer(Path(tok_dir))
    pools = torch.load(pool_file)
    if barrier is not None:
        barrier.wait()  # start together, so the step-rate probes see the real contention
    with open(Path(log_dir) / f"{name}.log", "w") as log:
        try:
            rec = train_model(s, pools, tok, Path(out), device, deadline, seed, log, eval_per_domain)
        except Exception as exc:  # keep the other models going; the parent reports it

            traceback.print_exc(file=log)
            rec = {"name": name, "error": repr(exc)}
    (Path(log_dir) / f"{name}.json").write_text(json.dumps(rec) + "\n")


def run_parallel(settings: list[dict], pools: dict, tok_dir: Path, out: Path, device: str,
                 deadline: float | None, seed: int, jobs: int, eval_per_domain: int,
                 target=None, extra_args=()) -> list[dict]:
    """Run one process per model (`jobs` at a time) and collect their records."""


    target = target or _worker
    work = Path(tempfile.mkdtemp(prefix="zoo-"))
    pool_file = work / "pools.pt"
    torch.save(pools, pool_file)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    records = []
    for i in range(0, len(settings), jobs):
        wave = settings[i : i + jobs]
        barrier = ctx.Barrier(len(wave))
        procs = [ctx.Process(target=target, args=(s["name"], s, str(pool_file), str(tok_dir), str(out), device,
                                                  deadline, seed, str(log_dir), eval_per_domain, barrier,
                                                  *extra_args)) for s in wave]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        for s in wave:
            f = log_dir / f"{s['name']}.json"
            records.append(json.loads(f.read_text()) if f.exists() else {"name": s["name"], "error": "no record"})
    shutil.rmtree(work, ignore_errors=True)
    return records


# -- command line ------------------------------------------------------------------------------


def print_records(records: list[dict]) -> None:
    """One line per model: size, steps, minutes, loss, test accuracy by domain, held-out mean."""
    keys = sorted({k for r in records for k in r.get("test_accuracy", {}) if "/" not in k})
    print(f"{'model':<16}{'params':>12}{'steps':>8}{'min':>6}{'loss':>8}" + "".join(f"{k:>8}" for k in keys)
          + f"{'heldout':>9}")
    for r in records:
        if "error" in r:
            print(f"{r['name']:<16} FAILED: {r['error']}")
            continue
        acc = r.get("test_accuracy", {})
        held = [v for k, v in r.get("heldout_accuracy", {}).items() if "/" not in k and k in r["domains"]]
        print(f"{r['name']:<16}{r['params']:>12,}{r['steps']:>8}{r['seconds'] / 60:>6.1f}{r['final_loss'] or 0:>8.3f}"
              + "".join(f"{acc.get(k, float('nan')):>8.3f}" for k in keys)
              + f"{(sum(held) / len(held) if held else float('nan')):>9.3f}")


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="zoo config (default configs/zoo.yaml)")
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the trained models")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time limit: training stops then, finished or not")
    parser.add_argument("--fit-steps", action="store_true",
                        help="lower each model's step count so its schedule ends by --max-minutes "
                             "(a model's `fit_steps: true` in the config does it for that model)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once, one process each")
    parser.add_argument("--steps", type=int, default=None, help="override every model's step count")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--pool", type=int, default=None, help="override the examples drawn per domain")
    parser.add_argument("--procs", type=int, default=None, help="processes drawing the training pools")
    parser.add_argument("--eval-per-domain", type=int, default=None, help="test prompts per domain after training")


def override(s: dict, args) -> None:
    if args.steps is not None:
        s["steps"] = args.steps
        s["warmup"] = min(int(s["warmup"]), max(1, args.steps // 10))
    if args.batch_size is not None:
        s["batch_size"] = args.batch_size
    if args.fit_steps:
        s["fit_steps"] = True
    s.setdefault("fit_steps", False)


def prepare(args, section: str):
    cfg = load_config(args.config)
    names = [n for n in args.only.split(",") if n] or list(cfg[section])
    settings = [model_settings(cfg, n, section) for n in names]
    for s in settings:
        override(s, args)
    tok_dir = config_path(cfg, "tokenizer", TOKENIZER_DIR)
    tok = load_tokenizer(tok_dir, int(cfg.get("vocab_size", 512)))
    seed = int(cfg.get("seed", 0))
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    pool_n = args.pool or int(cfg["train"]["pool_per_domain"])
    eval_n = args.eval_per_domain if args.eval_per_domain is not None else int(cfg["train"].get("eval_per_domain", 0))
    return cfg, settings, tok_dir, tok, seed, deadline, pool_n, eval_n


def cmd_train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve zoo train", description="train the demo expert zoo")
    common_args(parser)
    args = parser.parse_args(argv)
    cfg, settings, tok_dir, tok, seed, deadline, pool_n, eval_n = prepare(args, "models")
    out = args.out or config_path(cfg, "out", MODELS_DIR)
    max_len = int(cfg["train"]["max_len"])
    domains = sorted({d for s in settings for d in s["domains"]})
    t0 = time.time()
    pools = build_pools(tok_dir, domains, pool_n, seed, max_len, args.procs)
    print(f"pools: {pool_n:,} examples x {len(domains)} domains in {time.time() - t0:.0f}s", flush=True)
    if args.jobs > 1:
        records = run_parallel(settings, pools, tok_dir, out, args.device, deadline, seed, args.jobs, eval_n)
    else:
        records = [train_model(s, pools, tok, out, args.device, deadline, seed, eval_per_domain=eval_n)
                   for s in settings]
    for r in records:
        r.pop("losses", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_training.json").write_text(json.dumps(records, indent=1) + "\n")
    print_records(records)
    return 1 if any("error" in r for r in records) else 0
