"""The router report of `frugalserve calibrate` / `eval-router`: `report.json` (what
`frugalserve.cascade.evaluate.evaluate_router` measured), `report.md` (its tables) and two plots
(the cost-accuracy frontier, the performance gap recovered)."""

from __future__ import annotations

import json
from pathlib import Path

from frugalserve.cascade.artifact import json_default
from frugalserve.cascade.metrics import pgr_curve
from matplotlib.figure import Figure


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _ci(block: dict, key: str) -> str:
    lo, hi = block.get(f"{key}_ci95", (None, None))
    return "" if lo is None else f" [{lo:.3g}, {hi:.3g}]"


def write_report(report: dict, out: Path, label: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=json_default) + "\n")
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
              "Scorer AUROC (trained) [95 % CI] vs mean-logprob AUROC, per expert: " + ", ".join(
                  f"{e} {_f(report['scorer_auroc'][e])}{_auc_ci(report, e)} / "
                  f"{_f(report['logprob_auroc'][e])}"
                  for e in report["single"]), "", *_mix_lines(report),
              "![frontier](frontier.png)", "", "![pgr](pgr.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(report, out)


def _auc_ci(report: dict, e: str) -> str:
    lo, hi = (report.get("scorer_auroc_ci95") or {}).get(e, (None, None))
    return "" if lo is None or lo != lo else f" [{lo:.3f}, {hi:.3f}]"


def _mix_lines(report: dict) -> list[str]:
    """No regret: per traffic mix, each policy's cost relative to the strongest tier."""
    mixes = report.get("mixes") or {}
    if not mixes:
        return []
    c = report["cascade"]
    lines = [f"Traffic mixes (no regret: cost ≤ 1.0× `{report['strong']}` at accuracy ≥ its − 0.5 "
             f"point). {c.get('unfamiliar', 0)} of {report['n_prompts']} prompts were unfamiliar "
             "(sent to the fallback without climbing).", "",
             "| mix | n | strongest tier acc | cascade acc | cascade cost × | plain cascade cost × "
             "| moe acc | moe cost × | no regret (cascade / moe) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in mixes.items():
        ca, pl, mo = b["cascade"], b["cascade_plain"], b["moe"]
        lines.append(
            f"| {name} | {b['n']} | {b['strongest_accuracy']:.3f} | {ca['accuracy']:.3f} | "
            f"{ca['cost_vs_strongest']:.3f} | {pl['cost_vs_strongest']:.3f} | "
            f"{mo['accuracy']:.3f} | {mo['cost_vs_strongest']:.3f} | "
            f"{'yes' if ca['no_regret'] else 'no'} / {'yes' if mo['no_regret'] else 'no'} |")
    return [*lines, ""]


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _plots(report: dict, out: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
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

    s = report["single"]
    weak = (s[report["weak"]]["cost"], s[report["weak"]]["accuracy"])
    strong = (s[report["strong"]]["cost"], s[report["strong"]]["accuracy"])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
