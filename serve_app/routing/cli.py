"""`frugalserve calibrate` and `frugalserve eval-router`: fit the router offline, measure it.

    frugalserve calibrate --matrix calib.jsonl --out DIR        # or --limit N: run the zoo now
    frugalserve calibrate --data mine.jsonl --config CONFIG --out DIR [--url URL] [--judge EXPERT]
    frugalserve eval-router --split test --out REPORT_DIR [--router DIR] [--matrix test.jsonl]

Both write `report.json`, `report.md` and PNG plots (cost-accuracy frontier; performance gap
recovered; `report.py`). The fitting and the replay are `frugalserve.cascade`; this module adds
the prompt featurizer (MiniLM, which needs torch), response matrices made on the fly by the zoo's
evaluation harness, and the report files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

from frugalserve.cascade.artifact import ArtifactError, RouterArtifact
from frugalserve.cascade.calibrate import fit_router
from frugalserve.cascade.evaluate import evaluate_router
from frugalserve.cascade.graders import GRADERS
from frugalserve.cascade.matrix import ResponseMatrix
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.zoo import evaluate as harness
from frugalserve.experts.zoo import tasks as T
from frugalserve.serve_app.config import ConfigError, app_config_from_file
from frugalserve.serve_app.routing.collect import DataError, collect, items_from_logs, load_items
from frugalserve.serve_app.routing.featurizers import make_featurizer
from frugalserve.serve_app.routing.report import write_report
from tqdm import tqdm

DEFAULT_ROUTER = MODELS_DIR / "router"
DEFAULT_TIERS = "tier-s,tier-m,tier-l"


def _progress() -> Callable[[str, int, int], None]:
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
    if args.matrix is not None:
        return ResponseMatrix.load(args.matrix)
    tasks_ = T.generate(split, args.limit, seed=args.seed)
    rows = harness.evaluate(harness.parse_experts(args.experts), tasks_, device=args.device,
                            dtype="float32" if args.device == "cpu" else "auto")
    if args.save_matrix is not None:
        args.save_matrix.parent.mkdir(parents=True, exist_ok=True)
        args.save_matrix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ResponseMatrix.from_rows(rows)


def _data_matrix(args) -> ResponseMatrix:
    app = app_config_from_file(args.config)
    experts = ([e for e in args.experts.split(",") if e] if args.experts
               else [x.name for x in app.experts if x.name != args.judge])
    if args.from_logs is not None:
        items, counts = items_from_logs(args.from_logs, args.grader, judge=bool(args.judge))
        print(f"routing log {args.from_logs}: {counts}", file=sys.stderr)
    else:
        items = load_items(args.data, args.grader)
    cache = args.save_matrix or args.out / "responses.jsonl"
    rows = collect(items, app, cache, experts=experts, url=args.url, judge=args.judge,
                   device=args.device, concurrency=args.concurrency, max_tokens=args.max_tokens)
    print(f"responses cached in {cache}", file=sys.stderr)
    return ResponseMatrix.from_rows(rows, experts)


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
    parser.add_argument("--no-familiarity", action="store_true",
                        help="fit no familiarity detector (every prompt counts as familiar)")
    parser.add_argument("--tiers", default=None, help="cascade candidates, cheap first (default: "
                        f"{DEFAULT_TIERS}; with --data, every expert run)")
    byod = parser.add_argument_group("bring your own data (serve_app/routing/collect.py)")
    byod.add_argument("--data", type=Path, default=None,
                      help="JSONL of prompts (`prompt` or `messages`) with `answer` + `grader`, "
                      "`labels`, or nothing and --judge")
    byod.add_argument("--from-logs", type=Path, default=None, metavar="LOG",
                      help="instead of --data: the prompts of a routing log (routing.log_path, "
                      "with log_text) that got feedback, labelled by it")
    byod.add_argument("--config", type=Path, default=Path("configs/local.yaml"),
                      help="the application config whose experts run (default: %(default)s)")
    byod.add_argument("--url", default=None, help="a running application to ask (default: the "
                      "config's experts in process)")
    byod.add_argument("--grader", default="normalized", choices=GRADERS,
                      help="grader of lines with `answer` and no `grader`")
    byod.add_argument("--judge", default=None, help="expert that judges answers of lines with "
                      "neither `answer` nor `labels`")
    byod.add_argument("--concurrency", type=int, default=8, help="requests (batches) in flight")
    byod.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--featurizer", default="minilm", choices=("minilm", "hashed-ngrams"))
    parser.add_argument("--budget", type=float, default=None,
                        help="serve the most accurate cascade within this mean cost per request")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="serve the cheapest cascade reaching this accuracy (default: the "
                        "best tier's)")
    parser.add_argument("--max-depth", type=int, default=3, help="longest cascade searched")
    parser.add_argument("--deploy", default=None, metavar="URL",
                        help="then ask the running application at URL to serve the new artifact "
                        "(POST URL/v1/router; the path must be readable by its router; an API key "
                        "from $FRUGALSERVE_API_KEY)")
    args = parser.parse_args(argv)
    try:
        own = args.data is not None or args.from_logs is not None
        m = _data_matrix(args) if own else _matrix(args, "calib")
    except (DataError, ConfigError) as exc:
        print(f"frugalserve calibrate: {exc}", file=sys.stderr)
        return 2
    if args.tiers:
        tiers = [t for t in args.tiers.split(",") if t]
    elif own:
        tiers = sorted(m.experts, key=lambda e: float(m.mean_cost()[m.column(e)]))
    else:
        tiers = DEFAULT_TIERS.split(",")
    print(f"calibration matrix: {m.n} prompts x {len(m.experts)} experts {m.experts}",
          file=sys.stderr)
    featurize = make_featurizer(args.featurizer)
    x = featurize(m.prompts)
    try:
        result = fit_router(m, x, tiers=tiers, budget=args.budget,
                            target_accuracy=args.target_accuracy, max_depth=args.max_depth,
                            seed=args.seed, familiar=not args.no_familiarity,
                            progress=_progress())
    except ValueError as exc:
        print(f"frugalserve calibrate: {exc}", file=sys.stderr)
        return 2
    art = result.to_artifact(featurize.config(), meta={
        "calibrated_on": str(args.data or args.from_logs or args.matrix or f"calib split, {args.limit} prompts"),
        "date": date.today().isoformat(), "tiers": tiers,
    })
    art.save(args.out)
    report = evaluate_router(art, m, x, tiers=tiers, resamples=200, seed=args.seed)
    write_report(report, args.report or args.out / "calibration-report", "calib (in-sample)")
    p = art.cascade
    print(f"\nwrote router artifact {args.out}: cascade {' -> '.join(p.order)} thresholds "
          f"{[round(t, 4) for t in p.thresholds]} (calib accuracy {p.accuracy:.3f}, cost "
          f"{p.cost:.5f}); gate cost weight {art.gate.cost_weight}")
    return deploy(args.deploy, args.out) if args.deploy else 0


def deploy(url: str, artifact: Path) -> int:
    """POST the artifact's path to a running application's router; 0 when it swapped."""
    import os

    import httpx

    key = os.environ.get("FRUGALSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/router", json={"artifact": str(artifact.resolve())},
                       headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        print(f"frugalserve calibrate: --deploy {url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"frugalserve calibrate: {url} refused the artifact ({r.status_code}): {r.text}",
              file=sys.stderr)
        return 1
    print(f"{url} now serves {artifact} (swap {r.json()['swaps']})")
    return 0


def eval_router_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve eval-router", description=__doc__)
    _common(parser)
    parser.add_argument("--split", default="test", choices=("calib", "test", "train", "heldout"),
                        help="task-suite split when running now (heldout: the held-out phrasings)")
    parser.add_argument("--router", type=Path, default=DEFAULT_ROUTER, help="router artifact")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    try:
        art = RouterArtifact.load(args.router)
    except ArtifactError as exc:
        print(f"frugalserve eval-router: {exc}", file=sys.stderr)
        return 2
    m = _matrix(args, args.split)
    x = make_featurizer(art.featurizer)(m.prompts)
    report = evaluate_router(art, m, x, tiers=art.meta.get("tiers"), resamples=args.resamples,
                             seed=args.seed)
    label = str(args.matrix) if args.matrix else f"{args.split} split"
    write_report(report, args.out, label)
    c, g = report["cascade"], report["moe"]
    for name, mix in report["mixes"].items():
        print(f"  {name:12s} n={mix['n']:4d}  {mix['strongest']} {mix['strongest_accuracy']:.3f}  "
              + "  ".join(f"{p} {mix[p]['accuracy']:.3f} at {mix[p]['cost_vs_strongest']:.2f}x"
                          for p in ("cascade", "moe")))
    print(f"\n{label}: cascade accuracy {c['accuracy']:.3f} cost {c['cost']:.5f} "
          f"(largest tier {c['best_single_accuracy']:.3f} at {c['best_single_cost']:.5f}), "
          f"APGR {c['apgr']:.3f}; moe accuracy {g['accuracy']:.3f} cost {g['cost']:.5f}, "
          f"expert choice {g['expert_choice_accuracy']:.3f}; wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `frugalserve calibrate`
    return calibrate_main(argv)
