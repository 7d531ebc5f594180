"""Imports point downward: models, losses, data and evaluators know nothing of processes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "train"
ALLOWED = {"dist.py", "gradcache.py", "trainer.py", "run.py", "__main__.py"}


def imported_names(path: Path) -> set[str]:
    """Modules a file imports, plus `torch.distributed` when it reaches it as an attribute."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            names.add("torch.distributed")
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_only_the_engine_and_the_loop_touch_torch_distributed():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ALLOWED:
            continue
        names = imported_names(path)
        if any(n.startswith("torch.distributed") or n in ("train.dist", "train.gradcache") for n in names):
            offenders.append(path.name)
    assert offenders == []


def test_parts_do_not_import_jobs():
    jobs = {"train.trainer", "train.run", "train.__main__"}
    for name in ("model.py", "losses.py", "data.py", "evaluate.py", "retrieval.py", "assets.py", "optim.py"):
        assert not imported_names(PACKAGE / name) & jobs, name
