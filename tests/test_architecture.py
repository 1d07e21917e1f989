"""The import rules of docs/architecture.md, read from the source: which folder may import
which, and no circle between modules (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FOLDERS = {"frugalserve": "frugalserve", "serve_app": "frugalserve.serve_app",
           "experts": "frugalserve.experts", "cascade": "frugalserve.cascade",
           "kernels": "frugalserve.kernels", "cluster": "frugalserve.cluster"}

# area -> the areas it may import (besides itself); an area is the longest matching prefix
MAY_IMPORT = {
    "frugalserve.cascade": set(),
    "frugalserve.kernels": set(),
    "frugalserve.experts": {"frugalserve.kernels"},
    "frugalserve.experts.zoo": {"frugalserve.experts", "frugalserve.kernels"},
    "frugalserve.serve_app": {"frugalserve.experts", "frugalserve.cascade", "frugalserve"},
    # the calibration commands make response matrices on the fly with the zoo's harness
    "frugalserve.serve_app.routing.cli": {"frugalserve.serve_app", "frugalserve.experts",
                                          "frugalserve.experts.zoo", "frugalserve.cascade"},
    "frugalserve.cluster": {"frugalserve.serve_app.config", "frugalserve.experts.spec",
                            "frugalserve.experts.zoo.tasks", "frugalserve"},
    "frugalserve": set(),  # the command dispatcher loads subcommands by name only
}
# no torch, no Ray, no web framework in the decisions
CASCADE_FORBIDDEN = ("torch", "ray", "transformers", "fastapi", "starlette", "triton", "vllm")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute, with imports inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            subs = {f"{base}.{a.name}" for a in node.names} & MODULE_NAMES
            found |= subs or {base}  # `from . import x` imports the submodule x
    return found


MODULES = modules()
MODULE_NAMES = set(MODULES)
GRAPH = {name: {m for m in imports(name, path) if m in MODULES and m != name}
         for name, path in MODULES.items()}


def area(name: str) -> str:
    return max((a for a in MAY_IMPORT if name == a or name.startswith(a + ".")), key=len)


def test_every_folder_imports_only_what_it_may():
    wrong = []
    for name, deps in GRAPH.items():
        mine = area(name)
        for dep in deps:
            if area(dep) == mine or dep.startswith(mine + "."):
                continue
            if not any(dep == a or dep.startswith(a + ".") for a in MAY_IMPORT[mine]):
                wrong.append(f"{name} -> {dep}")
            elif area(dep) == "frugalserve.experts.zoo" and not any(
                    a.startswith("frugalserve.experts.zoo") for a in MAY_IMPORT[mine]):
                wrong.append(f"{name} -> {dep} (the offline zoo)")
    assert not wrong, wrong


def test_cascade_imports_no_torch_ray_or_web_framework():
    bad = [f"{n} -> {m}" for n, p in MODULES.items() if n.startswith("frugalserve.cascade")
           for m in imports(n, p) if m.split(".")[0] in CASCADE_FORBIDDEN]
    assert not bad, bad


def cycles() -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    return found


def test_no_import_circles():
    assert cycles() == []


@pytest.mark.parametrize("offline", ["frugalserve.experts.zoo"])
def test_the_runtime_never_imports_the_offline_zoo(offline):
    runtime = [n for n in GRAPH if not n.startswith(offline) and
               not n.startswith(("frugalserve.serve_app.routing.cli", "frugalserve.cluster.load"))]
    bad = [f"{n} -> {m}" for n in runtime for m in GRAPH[n] if m.startswith(offline)]
    assert not bad, bad
