"""Imports point down: root -> jobs -> build -> engine -> parts, and no cycle anywhere.

Every module of the package (subfolders included) has a level; a module may import its own level
or a lower one, never a higher one. Function-level imports count: a cycle hidden inside a function
is still a cycle. Models, losses, data and evaluators know nothing of processes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "train"

ROOT, JOBS, BUILD, ENGINE, PARTS = 4, 3, 2, 1, 0
LEVELS = {
    "train.__main__": ROOT, "train.run": ROOT,
    "train.build": BUILD,
    # the engine: processes, the step, checkpoints, the one embedding pass, and what runs them
    "train.dist": ENGINE, "train.engines": ENGINE, "train.gradcache": ENGINE, "train.embed": ENGINE,
    "train.checkpoint": ENGINE, "train.preempt": ENGINE, "train.record": ENGINE, "train.teacher": ENGINE,
    "train.rerank": ENGINE,
}
# only these touch torch.distributed (directly, or through train.dist / train.engines / train.gradcache)
DISTRIBUTED = {"train.dist", "train.engines", "train.gradcache", "train.embed", "train.__main__", "train.run",
               "train.build", "train.rerank"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def level(name: str) -> int:
    if name.startswith("train.jobs"):
        return JOBS
    return LEVELS.get(name, PARTS)


def imported_names(path: Path) -> set[str]:
    """Modules a file imports anywhere in it (function bodies too), plus `torch.distributed` when it
    reaches it as an attribute."""
    names = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and
                   isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}  # annotations only: never run, never a cycle
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            names.add("torch.distributed")
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; the package imports by absolute name"
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def internal_imports(path: Path, known: dict[str, Path], name: str | None = None) -> set[str]:
    """The package's own modules that a file imports (`from train import dist` counts as train.dist)."""
    return {n for n in imported_names(path) if n in known} - {name or module_name(path)}


def test_the_walk_sees_the_subpackages():
    names = set(modules())
    assert {"train.jobs.train", "train.jobs.mine", "train.assets", "train.assets.wikitext", "train.build"} <= names


def upward_imports(name: str, path: Path, known: dict[str, Path]) -> list[str]:
    return [f"{name} ({level(name)}) imports {dep} ({level(dep)})"
            for dep in sorted(internal_imports(path, known, name)) if level(dep) > level(name)]


def test_imports_point_down():
    known = modules()
    assert [line for name, path in known.items() for line in upward_imports(name, path, known)] == []


def test_no_import_cycle():
    known = modules()
    graph = {name: internal_imports(path, known) for name, path in known.items()}
    # a package's __init__ importing its own submodules is not a cycle
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [n, d]) if d in stack else f"{n} -> {d}")
            elif d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert cycles == []


def test_only_the_engine_and_the_loop_touch_torch_distributed():
    known = modules()
    offenders = []
    for name, path in known.items():
        if name in DISTRIBUTED or level(name) == JOBS:
            continue
        names = imported_names(path)
        if any(n.startswith("torch.distributed") or n in ("train.dist", "train.engines", "train.gradcache")
               for n in names):
            offenders.append(name)
    assert offenders == []


def test_the_checker_catches_a_part_importing_a_job(tmp_path):
    """The rule is live: a part that imports a job or the composition root is reported."""
    bad = tmp_path / "losses.py"
    bad.write_text("from train.jobs.train import fit\nfrom train import build\n\n\n"
                   "def late():\n    from train.run import run\n")
    assert upward_imports("train.losses", bad, modules()) == [
        "train.losses (0) imports train.build (2)", "train.losses (0) imports train.jobs.train (3)",
        "train.losses (0) imports train.run (4)"]
