"""`frugalserve calibrate` and `frugalserve eval-router`: fit the router offline, measure it.

    frugalserve calibrate --matrix calib.jsonl --out DIR        # or --limit N: run the zoo now
    frugalserve eval-router --split test --out REPORT_DIR [--router DIR] [--matrix test.jsonl]

Both write `report.json`, `report.md` and PNG plots (cost-accuracy frontier; performance gap
recovered). The fitting and the replay are `frugalserve.cascade`; this module adds the prompt
featurizer (MiniLM, which needs torch), response matrices made on the fly, and the report files.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
from frugalserve.experts.spec import MODELS_DIR

DEFAULT_ROUTER = MODELS_DIR / "router"
DEFAULT_TIERS = "tier-s,tier-m,tier-l"


def _progress():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=True)
        bar = bars[stage]
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _matrix(args, split: str):
    from frugalserve.cascade.matrix import ResponseMatrix

    if args.matrix is not None:
        return ResponseMatrix.load(args.matrix)
    from frugalserve.experts.zoo import evaluate as harness
    from frugalserve.experts.zoo import tasks as T

    tasks_ = T.generate(split, args.limit, seed=args.seed)
    rows = harness.evaluate(harness.parse_experts(args.experts), tasks_, device=args.device,
                            dtype="float32" if args.device == "cpu" else "auto")
    if args.save_matrix is not None:
        args.save_matrix.parent.mkdir(parents=True, exist_ok=True)
        args.save_matrix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ResponseMatrix.from_rows(rows)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matrix", type=Path, default=None,
                        help="response matrix JSONL from `frugalserve eval` (default: run now)")
    parser.add_argument("--limit", type=int, default=900, help="prompts when running now")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", default=None, help="experts to run now (default: the zoo)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--save-matrix", type=Path, default=None, help="keep the matrix made now")


def calibrate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve calibrate", description=__doc__)
    _common(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_ROUTER, help="router artifact folder")
    parser.add_argument("--report", type=Path, default=None, help="report folder (default: "
                        "OUT/calibration-report)")
    parser.add_argument("--tiers", default=DEFAULT_TIERS, help="cascade candidates, cheap first")
    parser.add_argument("--featurizer", default="minilm", choices=("minilm", "hashed-ngrams"))
    parser.add_argument("--budget", type=float, default=None,
                        help="serve the most accurate cascade within this mean cost per request")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="serve the cheapest cascade reaching this accuracy (default: the "
                        "best tier's)")
    parser.add_argument("--max-depth", type=int, default=3, help="longest cascade searched")
    args = parser.parse_args(argv)

    from frugalserve.cascade.calibrate import fit_router
    from frugalserve.cascade.evaluate import evaluate_router
    from frugalserve.experts.embedding import make_featurizer

    tiers = [t for t in args.tiers.split(",") if t]
    m = _matrix(args, "calib")
    print(f"calibration matrix: {m.n} prompts x {len(m.experts)} experts {m.experts}",
          file=sys.stderr)
    featurize = make_featurizer(args.featurizer)
    x = featurize(m.prompts)
    try:
        result = fit_router(m, x, tiers=tiers, budget=args.budget,
                            target_accuracy=args.target_accuracy, max_depth=args.max_depth,
                            seed=args.seed, progress=_progress())
    except ValueError as exc:
        print(f"frugalserve calibrate: {exc}", file=sys.stderr)
        return 2
    art = result.to_artifact(featurize.config(), meta={
        "calibrated_on": str(args.matrix or f"calib split, {args.limit} prompts"),
        "date": date.today().isoformat(), "tiers": tiers,
    })
    art.save(args.out)
    report = evaluate_router(art, m, x, tiers=tiers, resamples=200, seed=args.seed)
    write_report(report, args.report or args.out / "calibration-report", "calib (in-sample)")
    p = art.cascade
    print(f"\nwrote router artifact {args.out}: cascade {' -> '.join(p.order)} thresholds "
          f"{[round(t, 4) for t in p.thresholds]} (calib accuracy {p.accuracy:.3f}, cost "
          f"{p.cost:.5f}); gate cost weight {art.gate.cost_weight}")
    return 0


def eval_router_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve eval-router", description=__doc__)
    _common(parser)
    parser.add_argument("--split", default="test", choices=("calib", "test", "train"))
    parser.add_argument("--router", type=Path, default=DEFAULT_ROUTER, help="router artifact")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)

    from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
    from frugalserve.cascade.evaluate import evaluate_router
    from frugalserve.experts.embedding import make_featurizer

    try:
        art = RouterArtifact.load(args.router)
    except ArtifactError as exc:
        print(f"frugalserve eval-router: {exc}", file=sys.stderr)
        return 2
    m = _matrix(args, args.split)
    x = make_featurizer(art.featurizer)(m.prompts)
    report = evaluate_router(art, m, x, tiers=art.meta.get("tiers"), resamples=args.resamples,
                             seed=args.seed)
    write_report(report, args.out, f"{args.split} split")
    c, g = report["cascade"], report["moe"]
    print(f"\n{args.split}: cascade accuracy {c['accuracy']:.3f} cost {c['cost']:.5f} "
          f"(largest tier {c['best_single_accuracy']:.3f} at {c['best_single_cost']:.5f}), "
          f"APGR {c['apgr']:.3f}; moe accuracy {g['accuracy']:.3f} cost {g['cost']:.5f}, "
          f"expert choice {g['expert_choice_accuracy']:.3f}; wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `frugalserve calibrate`
    return calibrate_main(argv)


# -- report ---------------------------------------------------------------------------------


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _ci(block: dict, key: str) -> str:
    lo, hi = block.get(f"{key}_ci95", (None, None))
    return "" if lo is None else f" [{lo:.3g}, {hi:.3g}]"


def write_report(report: dict, out: Path, label: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    lines = [f"# Router report: {label}", "",
             f"{report['n_prompts']} prompts; weak tier `{report['weak']}`, strong tier "
             f"`{report['strong']}`.", "",
             "| policy | accuracy [95 % CI] | cost / request [95 % CI] | cost saved vs best single "
             "| parity | APGR | CPT(50 %) | CPT(80 %) |", "|---|---|---|---|---|---|---|---|"]
    for name in ("cascade", "moe"):
        b = report[name]
        lines.append(
            f"| {name} | {b['accuracy']:.3f}{_ci(b, 'accuracy')} | {b['cost']:.5f}"
            f"{_ci(b, 'cost')} | {_pct(b['cost_saved'])} | {'yes' if b['parity'] else 'no'} | "
            f"{b['apgr']:.3f} | {b['cpt50']:.1f} % | {b['cpt80']:.1f} % |")
    lines += ["", "| peer | accuracy | cost / request |", "|---|---|---|"]
    for e, s in report["single"].items():
        lines.append(f"| {e} | {s['accuracy']:.3f} | {s['cost']:.5f} |")
    lines.append(f"| oracle (cheapest correct expert) | {report['oracle']['accuracy']:.3f} | "
                 f"{report['oracle']['cost']:.5f} |")
    c, g = report["cascade"], report["moe"]
    lines += ["", f"Cascade: {' → '.join(c['order'])}, thresholds "
              f"{[round(t, 4) for t in c['thresholds']]}, answered by {c['answered_by']}, "
              f"{c['mean_calls']:.2f} expert calls per request. Best single expert: "
              f"`{c['best_single']}`; along the calibrated frontier, cost saved at parity: "
              f"{_pct(c['frontier_cost_saved_at_parity'])}, accuracy at its cost: "
              f"{c['accuracy_at_best_single_cost']}.",
              "", f"MoE gate: cost weight {g['cost_weight']}, picks a correct expert on "
              f"{_pct(g['expert_choice_accuracy'])} of the {g['solvable_prompts']} prompts some "
              f"expert answers correctly; choices {g['chosen']}.", "",
              "Scorer AUROC (trained) vs mean-logprob AUROC, per expert: " + ", ".join(
                  f"{e} {_f(report['scorer_auroc'][e])} / {_f(report['logprob_auroc'][e])}"
                  for e in report["single"]), "",
              "![frontier](frontier.png)", "", "![pgr](pgr.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(report, out)


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _plain(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from frugalserve.cascade.metrics import pgr_curve

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("cascade", "-o"), ("moe", "-s")):
        curve = sorted((p["cost"], p["accuracy"]) for p in report[name]["curve"])
        ax.plot(*zip(*curve), style, ms=3, alpha=0.7, label=f"{name} (frontier)")
        ax.plot(report[name]["cost"], report[name]["accuracy"], "*", ms=14,
                label=f"{name} (served)")
    for e, s in report["single"].items():
        ax.plot(s["cost"], s["accuracy"], "x", ms=8, color="black")
        ax.annotate(e, (s["cost"], s["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    mix = report["random_mix"]["points"]
    ax.plot([p["cost"] for p in mix], [p["accuracy"] for p in mix], "--", color="gray",
            label="random mixing")
    ax.plot(report["oracle"]["cost"], report["oracle"]["accuracy"], "D", color="green",
            label="oracle")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per request (cost units, log)")
    ax.set_ylabel("accuracy")
    ax.set_title("cost-accuracy frontier")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)

    s = report["single"]
    weak = (s[report["weak"]]["cost"], s[report["weak"]]["accuracy"])
    strong = (s[report["strong"]]["cost"], s[report["strong"]]["accuracy"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("cascade", "moe"):
        curve = report[name]["curve"]
        xs, ys = pgr_curve([p["cost"] for p in curve], [p["accuracy"] for p in curve], weak,
                           strong)
        ax.plot(xs * 100, ys, label=f"{name} (APGR {report[name]['apgr']:.2f})")
    ax.plot([0, 100], [0, 1], "--", color="gray", label="random (APGR 0.50)")
    ax.set_xlabel(f"normalised cost: % of the way from {report['weak']} to {report['strong']}")
    ax.set_ylabel("performance gap recovered")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pgr.png", dpi=120)
    plt.close(fig)
