"""The package's floor plan: imports point down the layers, no circle, small modules.

The layers, lowest first (a module may import its own layer and the ones below it, never one
above; function-local imports count too):

kernel (``srd.errors``, ``srd.io`` ... the run kernel at the top of ``srd/``) -> ``srd.data``
-> ``srd.captioner`` -> ``srd.attacks`` -> ``srd.evaluation`` -> ``srd.par`` / ``srd.soda`` ->
``srd.defenses`` (the registry, its shared stages and the baselines) -> ``srd.defenses.srd``
(SRD) -> ``srd.defenses.report`` and ``python -m srd.defenses``.

A package's ``__init__`` may import its own children (that is how the defense registry is
filled); nothing else may reach into a layer above its own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "srd"

KERNEL = (
    "errors", "io", "cli", "flags", "config", "runs", "stamp", "geometry", "captions", "budgets"
)  # fmt: skip
LAYERS: list[tuple[str, ...]] = [
    tuple(f"srd.{m}" for m in KERNEL),
    ("srd.data",),
    ("srd.captioner",),
    ("srd.attacks",),
    ("srd.evaluation",),
    ("srd.par", "srd.soda"),
    ("srd.defenses",),
    ("srd.defenses.srd",),
    (
        "srd.defenses.report",
        "srd.defenses.report_agent",
        "srd.defenses.report_budget",
        "srd.defenses.__main__",
    ),
]
MAX_LINES = 600
MAX_TOP_LEVEL = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``srd`` modules ``path`` imports (``from srd.x import name`` of a submodule counts as
    that submodule), at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "srd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "srd":
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def layer(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix naming ``module``'s layer."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        name: {m for m in imported_modules(path, modules) if m != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]], modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        is_package = modules[name].name == "__init__.py"
        for target in sorted(targets):
            if is_package and target.startswith(name + "."):
                continue  # a package's __init__ gathers its own children
            if layer(target) > layer(name):
                bad.append(f"{name} -> {target}")
    return bad


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_down() -> None:
    assert upward_imports(import_graph(), package_modules()) == []


def test_modules_are_small_and_the_top_is_the_kernel() -> None:
    long = {
        name: n
        for name, path in package_modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL
    assert set(top) == set(KERNEL)


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    graph = {"srd.data.a": {"srd.captioner.b"}, "srd.captioner.b": {"srd.data.a"}}
    modules = {name: Path(name.replace(".", "/") + ".py") for name in graph}
    assert cycles(graph) == [["srd.captioner.b", "srd.data.a"]]
    assert upward_imports(graph, modules) == ["srd.data.a -> srd.captioner.b"]
    with pytest.raises(AssertionError, match="no layer"):
        layer("srd.nowhere")


def test_stage_b_and_the_registry_do_not_load_the_agent() -> None:
    """Caption evaluation and the defense registry (what eval/evaluate.py imports) leave SRD's
    agent and its RL libraries unloaded: a lower layer never pays for a higher one."""
    code = (
        "import sys, srd.evaluation.captioning, srd.defenses; "
        "print(sorted(m for m in ('stable_baselines3', 'gymnasium', 'srd.defenses.srd.dqn') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
