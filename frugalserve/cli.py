"""The `frugalserve` command: a thin dispatcher that imports each subcommand lazily.

Each subcommand lives in the package that owns it and exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import sys

from frugalserve import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "serve": ("frugalserve.serve_app.run", "start the application from a config file"),
    "demo-models": ("frugalserve.experts.zoo.demo", "rebuild the tiny untrained demo models"),
    "zoo": ("frugalserve.experts.zoo.cli", "train the demo expert zoo (`zoo train`)"),
    "eval": ("frugalserve.experts.zoo.evaluate", "evaluate experts on the task suite"),
    "calibrate": ("frugalserve.serve_app.routing.cli", "fit the router on a response matrix"),
    "eval-router": ("frugalserve.serve_app.routing.cli:eval_router_main",
                    "evaluate a calibrated router on held-out prompts"),
    "plan": ("frugalserve.cluster.plan", "capacity planner: memory per token, replicas, GPUs"),
    "kuberay": ("frugalserve.cluster.kuberay", "print a KubeRay RayService manifest"),
    "finetune": ("frugalserve.experts.zoo.finetune", "QLoRA fine-tune an expert on one domain"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: frugalserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        print(__version__)
        return 0
    if name not in SUBCOMMANDS:
        print(f"frugalserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = SUBCOMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("frugalserve"):
            print(f"frugalserve: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
