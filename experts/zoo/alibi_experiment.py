"""ALiBi: train short, infer long (`frugalserve zoo alibi`).

Twins of one size are trained on the same token stream (chat examples of every domain, packed
back to back) with windows of L tokens: Falcon with ALiBi, Llama with RoPE, and Falcon with RoPE
(the same network as the ALiBi twin but for its position encoding). Each is then measured with
contexts of L, 2L, 4L and 8L tokens:

- perplexity over windows of the test stream (all tokens, and the last L tokens of each window);
- few-shot accuracy: a test prompt after a prefix of solved calib examples that fills the
  context to exactly n·L tokens, answered greedily and checked by exact match.

The results go to a JSON file; `--plot` draws them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch
from frugalserve.experts.transformers_engine import pick_device
from frugalserve.experts.zoo import data, train
from frugalserve.experts.zoo import tasks as T
from matplotlib.figure import Figure


def encode_stream(tok, tasks_: list[T.Task]):
    """The tasks as one packed token stream, and where each example ends."""
    texts = [data.chat_text(t.prompt, t.answer) for t in tasks_]
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [i for e in enc for i in e.ids]
    ends = torch.tensor([len(e.ids) for e in enc]).cumsum(0)
    return {"ids": torch.tensor(ids, dtype=torch.int16), "ends": ends}


def build_streams(tok, tok_dir: Path, n_per_domain: int, seed: int, n_eval: int, procs=None) -> dict:
    pools = data.build_pools(tok_dir, T.DOMAINS, n_per_domain, seed, 64, procs)
    return {
        "train": data.interleave(pools, T.DOMAINS),
        "calib": encode_stream(tok, T.generate("calib", 600, seed=seed)),
        "test": encode_stream(tok, T.generate("test", 600, seed=seed)),
        "queries": T.generate("test", n_eval, seed=seed + 1),
    }


class Windows:
    """Random windows of `length + 1` tokens from a packed stream, on the device."""

    def __init__(self, stream: dict, length: int, batch_size: int, device, seed: int):
        self.ids = stream["ids"].to(device)
        self.length, self.batch_size = length, batch_size
        self.offsets = torch.arange(length + 1, device=device)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def next(self):
        start = torch.randint(len(self.ids) - self.length - 1, (self.batch_size,), generator=self.gen,
                              device=self.ids.device)
        x = self.ids[start[:, None] + self.offsets].long()
        return x[:, :-1], x[:, 1:], torch.ones_like(x[:, 1:], dtype=torch.bool)


def perplexity(model, stream: dict, length: int, tail: int, windows: int, seed: int) -> tuple[float, float]:
    """(perplexity over every predicted token, over the last `tail`) on `windows` windows."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = stream["ids"]
    starts = torch.randint(len(ids) - length, (windows,), generator=gen)
    x = torch.stack([ids[s : s + length] for s in starts.tolist()]).long().to(device)
    parts = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for b in range(0, windows, 32):
            chunk = x[b : b + 32]
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            parts.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none"
            ).view(chunk.shape[0], -1).cpu())
    nll = torch.cat(parts)
    return math.exp(nll.mean().item()), math.exp(nll[:, -tail:].mean().item())


def few_shot_accuracy(model, tok, streams: dict, length: int, seed: int) -> dict:
    """Each query after solved calib examples filling the context to exactly `length` tokens."""
    calib, gen = streams["calib"], torch.Generator().manual_seed(seed)
    ends = calib["ends"][calib["ends"] >= length]
    prompts = []
    for q in streams["queries"]:
        query = tok(data.chat_text(q.prompt), add_special_tokens=False)["input_ids"]
        end = int(ends[torch.randint(len(ends), (1,), generator=gen)].item())
        prefix = calib["ids"][end - (length - len(query)) : end].tolist()
        prompts.append(prefix + query)
    answers = train.greedy(model, tok, prompts, batch_size=64 if length > 256 else 128)
    table: dict[str, list[int]] = {}
    for q, a in zip(streams["queries"], answers):
        ok = int(T.is_correct(a, q.answer))
        for key in ("all", q.domain):
            table.setdefault(key, []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in table.items()}


def long_context_eval(model, tok, streams: dict, s: dict, seed: int) -> list[dict]:
    rows = []
    L = int(s["max_len"])
    for factor in s["factors"]:
        n = factor * L
        ppl, ppl_tail = perplexity(model, streams["test"], n, L, int(s["eval_windows"]), seed)
        acc = few_shot_accuracy(model, tok, streams, n, seed)
        rows.append({"context": n, "factor": factor, "ppl": round(ppl, 4), "ppl_last_L": round(ppl_tail, 4),
                     "accuracy": acc["all"], "accuracy_by_domain": {k: v for k, v in acc.items() if k != "all"}})
    return rows


def _twin_worker(name, s, pool_file, tok_dir, out, device, deadline, seed, log_dir, eval_n, barrier):
    torch.set_num_threads(1)
    tok = data.load_tokenizer(Path(tok_dir))
    streams = torch.load(pool_file, weights_only=False)
    if barrier is not None:
        barrier.wait()
    with open(Path(log_dir) / f"{name}.log", "w") as log:
        try:
            rec = train_twin(s, streams, tok, device, deadline, seed, log)
        except Exception as exc:
            traceback.print_exc(file=log)
            rec = {"name": name, "error": repr(exc)}
    (Path(log_dir) / f"{name}.json").write_text(json.dumps(rec) + "\n")


def train_twin(s: dict, streams: dict, tok, device: str, deadline: float | None, seed: int, log=None) -> dict:
    device = pick_device(device).type
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = train.build_model(s, tok, seed).to(device)
    windows = Windows(streams["train"], int(s["max_len"]), int(s["batch_size"]), device, seed)
    record = {"name": s["name"], "arch": s["arch"], "params": train.num_params(model), "device": device}
    record.update(train.train_loop(model, windows.next, s, device, deadline=deadline, log=log, desc=s["name"]))
    record.pop("losses")
    record["long_context"] = long_context_eval(model, tok, streams, s, seed)
    return record


def settings_of(cfg: dict, name: str) -> dict:
    a = cfg["alibi"]
    if name not in a["models"]:
        raise KeyError(f"no twin {name!r} in the config's 'alibi' section; have {sorted(a['models'])}")
    return {**cfg["train"], **{k: v for k, v in a.items() if k != "models"}, **a["models"][name], "name": name,
            "domains": list(T.DOMAINS)}


def plot(results: list[dict], png: Path) -> None:
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        if "long_context" not in r:
            continue
        xs = [row["context"] for row in r["long_context"]]
        ax1.plot(xs, [row["ppl_last_L"] for row in r["long_context"]], marker="o", label=r["name"])
        ax2.plot(xs, [row["accuracy"] for row in r["long_context"]], marker="o", label=r["name"])
    L = results[0]["long_context"][0]["context"]
    for ax, title in ((ax1, "perplexity of the last L tokens"), (ax2, "few-shot task accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.axvline(L, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"context (tokens); trained with L = {L}")
        ax.set_title(title)
        ax.legend()
    ax1.set_yscale("log")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def print_table(results: list[dict]) -> None:
    print(f"{'model':<14}{'params':>10}{'steps':>7}{'ctx':>6}{'ppl':>9}{'pplL':>9}{'acc':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<14} FAILED: {r['error']}")
            continue
        for row in r["long_context"]:
            print(f"{r['name']:<14}{r['params']:>10,}{r['steps']:>7}{row['context']:>6}{row['ppl']:>9.3f}"
                  f"{row['ppl_last_L']:>9.3f}{row['accuracy']:>7.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve zoo alibi", description=__doc__.split("\n\n")[0])
    train.common_args(parser)
    parser.add_argument("--results", type=Path, default=Path("alibi_results.json"), help="JSON to write")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to draw")
    parser.add_argument("--plot-only", action="store_true", help="draw --plot from an existing --results")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(args.results.read_text())
        print_table(results)
        plot(results, args.plot)
        return 0
    cfg = train.load_config(args.config)
    names = [n for n in args.only.split(",") if n] or list(cfg["alibi"]["models"])
    settings = [settings_of(cfg, n) for n in names]
    for s in settings:
        train.override(s, args)
        if args.eval_per_domain is not None:
            s["eval_prompts"], s["eval_windows"] = 3 * args.eval_per_domain, 3 * args.eval_per_domain
    tok_dir = train.config_path(cfg, "tokenizer", data.TOKENIZER_DIR)
    tok = data.load_tokenizer(tok_dir)
    seed = int(cfg.get("seed", 0))
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    t0 = time.time()
    streams = build_streams(tok, tok_dir, args.pool or int(cfg["alibi"]["pool_per_domain"]), seed,
                            int(settings[0]["eval_prompts"]), args.procs)
    print(f"streams: {len(streams['train']['ids']):,} training tokens in {time.time() - t0:.0f}s", flush=True)
    out = args.out or Path("alibi_runs")
    if args.jobs > 1:
        results = train.run_parallel(settings, streams, tok_dir, out, args.device, deadline, seed, args.jobs, 0,
                                   target=_twin_worker)
    else:
        results = [train_twin(s, streams, tok, args.device, deadline, seed) for s in settings]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return 1 if any("error" in r for r in results) else 0
