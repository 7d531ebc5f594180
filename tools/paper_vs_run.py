"""Print a paper's published row beside a run's mteb results: `python tools/paper_vs_run.py RUN_DIR`.

RUN_DIR is a `recipe=eval eval=<simcse_sts|beir|mteb_eng>` run: its config.yaml names the paper's
row (eval.paper), its mteb/summary.json holds this run's scores (0-1, printed x 100 as papers do).
A missing file or a run without a paper row is one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def rows(paper: dict, summary: dict) -> list[tuple[str, float | None, float | None]]:
    ours = {r["task"]: 100 * r["score"] for r in summary["tasks"]}
    ours.update({f"average {t}": 100 * v for t, v in summary["by_type"].items()})
    if summary.get("mean") is not None:
        ours["average"] = 100 * summary["mean"]
    names = list(paper) + [n for n in ours if n not in paper]
    return [(n, paper.get(n), ours.get(n)) for n in names]


def table(source: str, lines: list[tuple[str, float | None, float | None]]) -> str:
    width = max(len(n) for n, _, _ in lines)
    out = [f"paper: {source}", f"{'':<{width}}  {'paper':>7}  {'this run':>8}  {'diff':>6}"]
    for name, p, o in lines:
        cell = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        diff = f"{o - p:+.2f}" if p is not None and o is not None else ""
        out.append(f"{name:<{width}}  {cell(p):>7}  {cell(o):>8}  {diff:>6}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/paper_vs_run.py RUN_DIR", file=sys.stderr)
        return 2
    run = Path(argv[0])
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "mteb" / "summary.json").read_text())
    except OSError as e:
        print(f"error: {run}: {e.strerror}: {e.filename} (expected a recipe=eval eval=mteb run dir)", file=sys.stderr)
        return 2
    paper = (cfg.get("eval") or {}).get("paper")
    if not paper:
        print(f"error: {run / 'config.yaml'}: eval.paper is not set (expected an eval config with a published row: "
              "eval=simcse_sts, eval=beir, eval=mteb_eng)", file=sys.stderr)
        return 2
    print(table(paper["source"], rows(paper["scores"], summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
