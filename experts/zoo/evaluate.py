"""The evaluation harness: `frugalserve eval --split test --limit N --out FILE`.

Runs experts on a split of the task suite and writes the response matrix: JSONL, one row per
prompt x expert, with the answer, whether it is right, the token log-probabilities the cascade's
scorer reads, token counts, cost and latency. Prints a summary table (accuracy by expert x domain
x difficulty, cost) and draws a plot. In process by default (the transformers engine, batched);
with `--url` against a running frugalserve server (OpenAI chat completions, `model` = expert).

An expert is named as `NAME` (a model of the zoo, `experts/zoo/models/NAME`), `NAME=PATH` or a path
to any Hugging Face causal LM folder with a chat template.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.spec import MODELS_DIR, default_cost_per_1k
from frugalserve.experts.zoo import tasks as T
from matplotlib.figure import Figure
from tqdm import tqdm

ZOO = ("tier-s", "tier-m", "tier-l", "expert-arith", "expert-text", "expert-facts")
MAX_TOKENS = 16
ROW_KEYS = (
    "id", "expert", "split", "domain", "difficulty", "kind", "prompt", "reference", "answer", "correct",
    "logprob_mean", "logprob_min", "logprob_first", "token_logprobs", "prompt_tokens",
    "completion_tokens", "cost", "latency_s", "finish_reason",
)


def make_row(task: T.Task, expert: str, text: str, logprobs: Sequence[float], prompt_tokens: int,
             completion_tokens: int, cost: float | None, latency_s: float, finish_reason: str | None) -> dict:
    lps = [float(x) for x in logprobs]
    return {
        "id": task.id, "expert": expert, "split": task.split, "domain": task.domain,
        "difficulty": task.difficulty, "kind": task.kind, "prompt": task.prompt,
        "reference": task.answer, "answer": text, "correct": T.is_correct(text, task.answer),
        "logprob_mean": sum(lps) / len(lps) if lps else None,
        "logprob_min": min(lps) if lps else None,
        "logprob_first": lps[0] if lps else None,
        "token_logprobs": lps, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cost": None if cost is None else round(cost, 9), "latency_s": round(latency_s, 6),
        "finish_reason": finish_reason,
    }


# -- experts -----------------------------------------------------------------------------------


def parse_experts(spec: str | None, models_dir: Path | None = None) -> list[tuple[str, Path]]:
    """`a,b=path,/some/folder` -> [(name, path)]; the default is every zoo model that exists."""
    base = models_dir or MODELS_DIR
    if not spec:
        found = [(n, base / n) for n in ZOO if (base / n / "config.json").is_file()]
        if not found:
            raise SystemExit(f"frugalserve eval: no zoo models under {base}; train them (`frugalserve zoo train`)")
        return found
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if "=" in item:
            name, path = item.split("=", 1)
            out.append((name, Path(path).expanduser()))
        elif item.startswith("builtin:") or not (Path(item).expanduser() / "config.json").is_file():
            name = item.removeprefix("builtin:")
            out.append((name, base / name))
        else:
            out.append((Path(item).name, Path(item).expanduser()))
    return out


class LocalRunner:
    """One expert in process: the transformers engine, `batch_size` requests per engine call."""

    def __init__(self, name: str, path: Path, device: str, dtype: str, batch_size: int):
        # torch: only the in-process runner needs it; `--url` evaluates without loading torch
        from frugalserve.experts.transformers_engine import TransformersEngine


        if not (path / "config.json").is_file():
            raise SystemExit(f"frugalserve eval: expert {name!r}: no Hugging Face model at {path}")
        self.name, self.batch_size = name, batch_size
        self.engine = TransformersEngine.from_path(path, device=device, dtype=dtype, name=name, use_kernels=False)
        self.params = sum(p.numel() for p in self.engine.model.parameters())
        self.cost_per_1k = default_cost_per_1k(self.params)

    def run(self, tasks_: Sequence[T.Task], progress) -> list[dict]:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        rows = []
        for b in range(0, len(tasks_), self.batch_size):
            chunk = tasks_[b : b + self.batch_size]
            requests = [GenerationRequest(params=params, messages=t.messages, request_id=t.id) for t in chunk]
            t0 = time.perf_counter()
            completions = asyncio.run(self.engine.generate(requests))
            latency = time.perf_counter() - t0  # every request of the batch waited the whole call
            for t, c in zip(chunk, completions):
                tokens = c.prompt_tokens + c.completion_tokens
                rows.append(make_row(t, self.name, c.text, c.token_logprobs, c.prompt_tokens,
                                     c.completion_tokens, tokens / 1000 * self.cost_per_1k, latency,
                                     c.finish_reason))
            progress.update(len(chunk))
        return rows


class HttpRunner:
    """One expert behind a running frugalserve server, `concurrency` requests in flight."""

    def __init__(self, name: str, url: str, concurrency: int, timeout: float = 120.0):
        self.name, self.url, self.concurrency, self.timeout = name, url.rstrip("/"), concurrency, timeout

    def _one(self, task: T.Task) -> dict:
        body = {"model": self.name, "messages": list(task.messages), "max_tokens": MAX_TOKENS,
                "temperature": 0, "logprobs": True}
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"frugalserve eval: {self.url} answered {exc.code} for expert {self.name!r}: "
                             f"{exc.read()[:500]!r}") from exc
        latency = time.perf_counter() - t0
        choice = data["choices"][0]
        lps = [c["logprob"] for c in ((choice.get("logprobs") or {}).get("content") or [])]
        usage = data.get("usage") or {}
        cost = (data.get("frugalserve") or {}).get("cost")
        return make_row(task, self.name, choice["message"]["content"] or "", lps, usage.get("prompt_tokens", 0),
                        usage.get("completion_tokens", len(lps)), cost, latency, choice.get("finish_reason"))

    def run(self, tasks_: Sequence[T.Task], progress) -> list[dict]:
        rows = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            for row in pool.map(self._one, tasks_):
                rows.append(row)
                progress.update(1)
        return rows


# -- summary -----------------------------------------------------------------------------------


def summarize(rows: Sequence[dict]) -> dict:
    """{expert: {"arith/1": acc, ..., "arith": acc, ..., "all": acc, "cost_per_1k_prompts": c, ...}}"""
    table: dict[str, dict[str, list]] = {}
    for r in rows:
        cell = table.setdefault(r["expert"], {})
        for key in (f"{r['domain']}/{r['difficulty']}", r["domain"], "all"):
            cell.setdefault(key, []).append(bool(r["correct"]))
        cell.setdefault("cost", []).append(r["cost"])
        cell.setdefault("latency", []).append(r["latency_s"])
    out = {}
    for expert, cell in table.items():
        acc = {k: sum(v) / len(v) for k, v in cell.items() if k not in ("cost", "latency")}
        costs = [c for c in cell["cost"] if c is not None]
        acc["cost_per_1k_prompts"] = 1000 * sum(costs) / len(costs) if costs else math.nan
        acc["latency_s_mean"] = sum(cell["latency"]) / len(cell["latency"])
        acc["n"] = len(cell["latency"])
        out[expert] = acc
    return out


def format_table(summary: dict) -> str:
    """A Markdown table: one row per expert, accuracy per domain x difficulty, then cost."""
    cells = sorted({k for s in summary.values() for k in s if "/" in k})
    domains = [d for d in T.DOMAINS if any(c.startswith(d + "/") for c in cells)]
    cols = [c for d in domains for c in [*(x for x in cells if x.startswith(d + "/")), d]] + ["all"]
    head = "| expert | " + " | ".join(cols) + " | cost / 1k prompts |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for expert, s in summary.items():
        vals = " | ".join(f"{100 * s[c]:.1f}" if c in s else "" for c in cols)
        lines.append(f"| {expert} | {vals} | {s['cost_per_1k_prompts']:.3g} |")
    return "\n".join(lines)


def plot(summary: dict, png: Path) -> None:
    experts = list(summary)
    domains = [d for d in T.DOMAINS if any(d in s for s in summary.values())]
    fig = Figure(figsize=(12, 4.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(domains))
    for i, d in enumerate(domains):
        xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(experts))]
        ax1.bar(xs, [100 * summary[e].get(d, 0) for e in experts], width, label=d)
    ax1.set_xticks(range(len(experts)), experts, rotation=20)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("accuracy by domain")
    ax1.set_ylim(0, 118)
    ax1.legend(loc="upper center", ncol=len(domains), fontsize=8)
    for e in experts:
        ax2.scatter(summary[e]["cost_per_1k_prompts"], 100 * summary[e]["all"], s=30)
        ax2.annotate(e, (summary[e]["cost_per_1k_prompts"], 100 * summary[e]["all"]), fontsize=8,
                     xytext=(4, 2), textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_xlabel("cost per 1k prompts (units)")
    ax2.set_ylabel("accuracy, all domains (%)")
    ax2.set_title("accuracy vs cost")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


# -- command line ------------------------------------------------------------------------------


def evaluate(experts: list[tuple[str, Path]], tasks_: list[T.Task], *, url: str | None = None,
             device: str = "cpu", dtype: str = "float32", batch_size: int = 64, concurrency: int = 8,
             progress: bool = True) -> list[dict]:
    rows = []
    with tqdm(total=len(experts) * len(tasks_), desc="eval", unit="prompt", disable=not progress) as bar:
        for name, path in experts:
            bar.set_postfix(expert=name)
            runner = HttpRunner(name, url, concurrency) if url else LocalRunner(name, path, device, dtype, batch_size)
            rows += runner.run(tasks_, bar)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="test", choices=list(T.EVAL_SPLITS))
    parser.add_argument("--limit", type=int, default=900, help="prompts (balanced over domains x difficulties)")
    parser.add_argument("--seed", type=int, default=0, help="which draw of the split")
    parser.add_argument("--domains", default=",".join(T.DOMAINS))
    parser.add_argument("--experts", default=None, help="NAME | NAME=PATH | PATH, comma-separated (default: the zoo)")
    parser.add_argument("--models-dir", type=Path, default=None, help="where NAME is looked up (default: the zoo's)")
    parser.add_argument("--url", default=None, help="a running frugalserve server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, required=True, help="response matrix (JSONL)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to draw (default: beside --out)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--batch-size", type=int, default=64, help="requests per engine call (in process)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (--url)")
    args = parser.parse_args(argv)

    domains = tuple(d for d in args.domains.split(",") if d)
    tasks_ = T.generate(args.split, args.limit, seed=args.seed, domains=domains)
    experts = parse_experts(args.experts, args.models_dir)
    rows = evaluate(experts, tasks_, url=args.url, device=args.device, dtype=args.dtype,
                    batch_size=args.batch_size, concurrency=args.concurrency, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = summarize(rows)
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{args.split} split, {len(tasks_)} prompts, accuracy (%) by domain/difficulty:\n")
    print(format_table(summary))
    png = args.plot or args.out.with_suffix(".png")
    plot(summary, png)
    print(f"\nwrote {args.out} ({len(rows)} rows), {args.out.with_suffix('.summary.json')}, {png}", file=sys.stderr)
    return 0
