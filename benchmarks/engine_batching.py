"""Engine level, without Ray: the paged continuous-batching engine against the plain
static-batch engine and Hugging Face `generate` on the same model, at batch 1..64, fixed output
length (ignore_eos), greedy.

    python benchmarks/engine_batching.py --model experts/zoo/models/tier-l [--device cuda]

Reports tokens/s and the per-token latency (ms per decoding step at batch 1). Rows: `paged`
(CUDA graphs on GPU), `paged-eager` (GPU only: graphs off), `static` (one padded batch at a time;
frugalserve's kernels through transformers' attention interface on GPU), and the peers
`hf-generate` (`model.generate` on a left-padded batch, `min_new_tokens` = `max_new_tokens`) and
`hf-continuous` (transformers' own continuous batching, `generate_batch`, eos disabled). Median of `--repeats` timed runs after a warm-up run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.paged.engine import PagedConfig, PagedEngine
from frugalserve.experts.transformers_engine import TransformersEngine


def requests(n: int, max_tokens: int) -> list[GenerationRequest]:
    return [GenerationRequest(
        messages=({"role": "user", "content": f"What is {17 * i + 3} + {29 * i + 11}?"},),
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id=f"r{i}")
        for i in range(n)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(engine, batch: int, max_tokens: int, repeats: int) -> tuple[float, int]:
    reqs = requests(batch, max_tokens)
    asyncio.run(engine.generate(reqs))  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        _sync(engine.device)
        t0 = time.perf_counter()
        out = asyncio.run(engine.generate(reqs))
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
        tokens = sum(c.completion_tokens for c in out)
    return statistics.median(times), tokens


def time_hf_generate(engine: TransformersEngine, batch: int, max_tokens: int,
                     repeats: int) -> tuple[float, int]:
    tok, model = engine.tokenizer, engine.model
    texts = [tok.apply_chat_template(list(r.messages), add_generation_prompt=True, tokenize=False)
             for r in requests(batch, max_tokens)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.device)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                  pad_token_id=engine.pad_id)
    with torch.inference_mode():
        model.generate(**enc, **kwargs)
        times = []
        for _ in range(repeats):
            _sync(engine.device)
            t0 = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), batch * (out.shape[1] - enc["input_ids"].shape[1])


def time_hf_continuous(engine: TransformersEngine, batch: int, max_tokens: int,
                       repeats: int) -> tuple[float, int]:
    """transformers' own continuous batching (`generate_batch`, a paged cache), eos disabled."""
    from transformers import GenerationConfig

    inputs = [engine.encode(r) for r in requests(batch, max_tokens)]
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=engine.pad_id)
    engine.model.generate_batch(inputs=inputs, generation_config=config)  # its own no-grad
    times = []
    for _ in range(repeats):
        _sync(engine.device)
        t0 = time.perf_counter()
        out = engine.model.generate_batch(inputs=inputs, generation_config=config)
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(o.generated_tokens) for o in out.values())
    if tokens == 0:
        raise RuntimeError("generate_batch generated no tokens")
    return statistics.median(times), tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("experts/zoo/models/tier-l"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="paged,paged-eager,static,hf-generate,hf-continuous")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engine-batching.json"))
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    wanted = args.engines.split(",")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda:
        wanted = [w for w in wanted if w != "paged-eager"]  # graphs are GPU-only anyway
    rows = []
    for kind in wanted:
        if kind.startswith("paged"):
            config = PagedConfig(max_num_seqs=max(batches), cuda_graphs=kind == "paged")
            engine = PagedEngine.from_path(args.model, device=args.device, dtype=args.dtype,
                                           config=config)
            attention = engine.info().attention
        else:  # the peers run stock transformers attention (sdpa); `static` runs our kernels
            engine = TransformersEngine.from_path(args.model, device=args.device, dtype=args.dtype,
                                                  use_kernels=kind == "static")
            attention = engine.info().attention
        for b in batches:
            try:
                if kind == "hf-generate":
                    seconds, tokens = time_hf_generate(engine, b, args.max_tokens, args.repeats)
                elif kind == "hf-continuous":
                    seconds, tokens = time_hf_continuous(engine, b, args.max_tokens, args.repeats)
                else:
                    seconds, tokens = time_engine(engine, b, args.max_tokens, args.repeats)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                print(f"  {kind} batch {b}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows.append({"engine": kind, "batch": b, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row = {"engine": kind, "batch": b, "tokens": tokens, "seconds": seconds,
                   "tokens_per_s": tokens / seconds,
                   "ms_per_step": seconds / (tokens / b) * 1000, "attention": attention}
            rows.append(row)
            print(f"  {kind:<12} batch {b:>3}: {row['tokens_per_s']:10.1f} tok/s, "
                  f"{row['ms_per_step']:.2f} ms/step", file=sys.stderr)
        if hasattr(engine, "close"):
            engine.close()
        del engine
        if cuda:
            torch.cuda.empty_cache()
    ok = [r for r in rows if "error" not in r]
    for row in ok:
        peer = next((r for r in ok if r["engine"] == "hf-generate" and r["batch"] == row["batch"]),
                    None)
        row["vs_hf_generate"] = row["tokens_per_s"] / peer["tokens_per_s"] if peer else None
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU"
    result = {"date": date.today().isoformat(), "device": device, "torch": torch.__version__,
              "model": str(args.model), "max_tokens": args.max_tokens, "rows": rows,
              "command": "python benchmarks/engine_batching.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nengine level, {args.model.name}, {device}, {args.max_tokens} new tokens each "
          "(ignore_eos), greedy")
    print(f"{'engine':<12} {'batch':>5} {'tokens/s':>10} {'ms/step':>8} {'vs HF generate':>15}")
    for r in ok:
        ratio = f"{r['vs_hf_generate']:.2f}x" if r["vs_hf_generate"] else "-"
        print(f"{r['engine']:<12} {r['batch']:>5} {r['tokens_per_s']:>10.1f} "
              f"{r['ms_per_step']:>8.2f} {ratio:>15}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
