"""Weight memory and accuracy of each zoo tier in bf16, int8 and NF4 (bitsandbytes).

    python benchmarks/quantization.py [--limit 300] [--device cpu]

The peer in the same run is the bf16 model: memory ratios and accuracy deltas are against it.
Accuracy: the test split of the task suite, greedy. Also, with `--adapter DIR`, the accuracy of
a LoRA adapter's domain before and after (the adapter on its base).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from datetime import date
from pathlib import Path

from frugalserve.experts.engine import GenerationRequest, SamplingParams
from frugalserve.experts.quant import linear_weight_bytes
from frugalserve.experts.spec import resolve_model_path
from frugalserve.experts.transformers_engine import TransformersEngine
from frugalserve.experts.zoo import tasks as T


def accuracy(engine, tasks_, adapter=None) -> float:
    ok = 0
    for i in range(0, len(tasks_), 100):
        chunk = tasks_[i:i + 100]
        reqs = [GenerationRequest(messages=t.messages, adapter=adapter,
                                  params=SamplingParams(max_tokens=16)) for t in chunk]
        out = asyncio.run(engine.generate(reqs))
        ok += sum(T.is_correct(c.text, t.answer) for c, t in zip(out, chunk))
    return ok / len(tasks_)


def matrix_bytes(engine) -> int:
    return linear_weight_bytes(engine.model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiers", default="tier-s,tier-m,tier-l")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter folder to measure")
    p.add_argument("--adapter-only", action="store_true", help="skip the tier table")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization.json"))
    args = p.parse_args(argv)
    tasks_ = T.generate("test", args.limit)
    rows = []
    for tier in ([] if args.adapter_only else args.tiers.split(",")):
        path = resolve_model_path(f"builtin:{tier}")
        for kind in ("bf16", "int8", "nf4"):
            try:
                eng = TransformersEngine.from_path(
                    path, device=args.device, dtype="bfloat16" if kind == "bf16" else "float32",
                    quantization="none" if kind == "bf16" else kind, use_kernels=False)
            except ValueError as exc:
                rows.append({"tier": tier, "weights": kind, "error": str(exc)})
                print(f"  {tier} {kind}: {exc}", file=sys.stderr)
                continue
            row = {"tier": tier, "weights": kind,
                   "weight_bytes": int(eng.weight_bytes()),
                   "matrix_bytes": matrix_bytes(eng), "accuracy": accuracy(eng, tasks_)}
            rows.append(row)
            print(f"  {tier} {kind}: {row}", file=sys.stderr)
    for row in rows:
        base = next((r for r in rows if r["tier"] == row["tier"] and r["weights"] == "bf16"), None)
        if "error" not in row and base:
            row["matrix_ratio_vs_bf16"] = row["matrix_bytes"] / base["matrix_bytes"]
            row["accuracy_delta_vs_bf16"] = row["accuracy"] - base["accuracy"]
    adapter = None
    if args.adapter is not None:
        meta = json.loads((args.adapter / "finetune.json").read_text())
        domain = meta["domain"]
        dom_tasks = T.generate("test", 3 * args.limit, domains=(domain,))[:args.limit]
        base_path = Path(meta["base"])
        adapter = {"base": base_path.name, "domain": domain, "prompts": len(dom_tasks),
                   "adapter_bytes": meta["adapter_bytes"], "train": meta}
        # on the float32 base (adapter merged into full weights) and on the NF4 base it was
        # trained against (QLoRA as trained)
        for label, quant in (("fp32_base", "none"), ("nf4_base", "nf4")):
            try:
                eng = TransformersEngine.from_path(
                    base_path, device=args.device, dtype="float32", quantization=quant,
                    adapters={"adapter": args.adapter}, use_kernels=False)
            except ValueError as exc:
                adapter[label] = {"error": str(exc)}
                continue
            adapter[label] = {"before": accuracy(eng, dom_tasks),
                              "after": accuracy(eng, dom_tasks, "adapter")}
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()} CPU",
              "limit": args.limit, "rows": rows, "adapter": adapter,
              "command": "python benchmarks/quantization.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nweights and accuracy on {args.limit} test prompts ({result['machine']})")
    print(f"{'tier':<8} {'weights':<6} {'weight MB':>9} {'matrices vs bf16':>17} {'accuracy':>9} "
          f"{'Δ vs bf16':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['tier']:<8} {r['weights']:<6} {'—':>9} {'—':>17} {'—':>9} {'—':>9}  "
                  f"({r['error'][:60]})")
            continue
        print(f"{r['tier']:<8} {r['weights']:<6} {r['weight_bytes'] / 1e6:>9.2f} "
              f"{r['matrix_ratio_vs_bf16']:>16.2f}x {r['accuracy']:>9.3f} "
              f"{r['accuracy_delta_vs_bf16']:>+9.3f}")
    if adapter:
        for label in ("fp32_base", "nf4_base"):
            a = adapter.get(label, {})
            if "before" in a:
                print(f"adapter on {adapter['base']} ({label}), {adapter['domain']} "
                      f"({adapter['prompts']} prompts): {a['before']:.3f} -> {a['after']:.3f}, "
                      f"{adapter['adapter_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
