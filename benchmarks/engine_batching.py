"""Engine-level batching gain and attention backend, without Ray: tokens/s of the transformers
engine at batch sizes 1..32, with transformers' own attention and with frugalserve's kernels.

    python benchmarks/engine_batching.py --model experts/models/tier-l [--device cuda]

The peer in the same run is batch 1 (for the batching gain) and transformers' attention (for the
kernels). Greedy decoding of a fixed number of new tokens; median of `--repeats` runs.
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
from frugalserve.experts.transformers_engine import TransformersEngine


def requests(n: int, max_tokens: int) -> list[GenerationRequest]:
    return [GenerationRequest(
        messages=({"role": "user", "content": f"What is {17 * i + 3} + {29 * i + 11}?"},),
        params=SamplingParams(max_tokens=max_tokens), request_id=f"r{i}") for i in range(n)]


def eos_free(engine: TransformersEngine) -> None:
    """Decode exactly max_tokens per request so every batch does the same work."""
    engine.eos_ids = {-1}


def measure(engine, batch: int, max_tokens: int, repeats: int) -> dict:
    reqs = requests(batch, max_tokens)
    asyncio.run(engine.generate(reqs))  # warm-up
    times = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = asyncio.run(engine.generate(reqs))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = sum(c.completion_tokens for c in out)
    t = statistics.median(times)
    return {"batch": batch, "tokens": tokens, "seconds": t, "tokens_per_s": tokens / t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("experts/models/tier-l"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engine-batching.json"))
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    backends = [False, True] if torch.cuda.is_available() and args.device != "cpu" else [False]
    rows = []
    for use_kernels in backends:
        engine = TransformersEngine.from_path(args.model, device=args.device, dtype=args.dtype,
                                              use_kernels=use_kernels)
        eos_free(engine)
        for b in batches:
            row = measure(engine, b, args.max_tokens, args.repeats)
            row["attention"] = engine.attention_backend
            rows.append(row)
            print(f"  {row['attention'][:40]:<40} batch {b:>3}: {row['tokens_per_s']:9.1f} tok/s",
                  file=sys.stderr)
        del engine
    for row in rows:
        base = next(r for r in rows if r["attention"] == row["attention"] and r["batch"] == 1)
        row["gain_vs_batch1"] = row["tokens_per_s"] / base["tokens_per_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    result = {"date": date.today().isoformat(), "device": device, "torch": torch.__version__,
              "model": str(args.model), "max_tokens": args.max_tokens, "rows": rows,
              "command": "python benchmarks/engine_batching.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nengine batching, {args.model.name}, {device}, {args.max_tokens} new tokens each")
    print(f"{'attention':<42} {'batch':>5} {'tokens/s':>10} {'vs batch 1':>10}")
    for r in rows:
        print(f"{r['attention'][:42]:<42} {r['batch']:>5} {r['tokens_per_s']:>10.1f} "
              f"{r['gain_vs_batch1']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
