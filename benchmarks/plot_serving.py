"""Plot serving results (tokens/s and TTFT against concurrent clients) from benchmarks/serving.py
JSON files into one figure.

    python benchmarks/plot_serving.py [--out docs/img/serving.png] LABEL=FILE ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT = [
    "H200, direct ingress=benchmarks/results/serving-h200.json",
    "H200, Serve's proxy=benchmarks/results/serving-h200-proxy.json",
    "2 CPUs, demo-llama=benchmarks/results/serving-cpu.json",
    "2 CPUs, tier-l=benchmarks/results/serving-cpu-tier-l.json",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="*", default=DEFAULT, help="LABEL=FILE")
    p.add_argument("--out", type=Path, default=Path("docs/img/serving.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for run in args.runs:
        label, path = run.split("=", 1)
        rows = json.loads(Path(path).read_text())["rows"]
        c = [r["concurrency"] for r in rows]
        ax1.plot(c, [r["ratio_vs_c1"] for r in rows], marker="o", label=label)
        ax2.plot(c, [r["ttft_p50_ms"] for r in rows], marker="o", label=label)
    ax1.plot([1, 64], [1, 64], ls=":", color="grey", label="linear")
    for ax, title in ((ax1, "tokens/s, relative to 1 client"), (ax2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (64 streamed tokens each)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
