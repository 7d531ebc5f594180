"""Turn a sweep directory into a table and a plot.

    python -m train -m recipe=simcse_sup optim.lr=1e-5,3e-5,5e-5       # -> multirun/<stamp>/{0,1,2}
    python tools/sweep_report.py multirun/<stamp> [--metric snli_sts/spearman] [--x optim.lr]

Every run dir below the sweep dir (any folder with a config.yaml) is a row; the columns are the
config keys whose values differ between runs (what was swept), then the final metrics (eval.json:
`after` of a training run, `metrics` of an eval run) and the last logged training loss. Writes
sweep.md, sweep.csv and sweep.png (the metric against the swept value; one line per combination of
the other swept keys) into the sweep dir, and prints the markdown table. The plot needs matplotlib
(`pip install -e '.[sweep]'`); without it the tables are written and a line says so. A run that did
not finish shows its last loss and empty metrics, so a crashed point is visible instead of missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from train.checkpoint import flatten


def read_run(run: Path) -> dict:
    config = {k: json.dumps(v) if isinstance(v, list) else v
              for k, v in flatten(yaml.safe_load((run / "config.yaml").read_text()) or {}).items()}
    metrics: dict = {}
    if (run / "eval.json").exists():
        summary = json.loads((run / "eval.json").read_text())
        metrics = summary.get("after") or summary.get("metrics") or {}
    loss = None
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "loss" in record:
                loss = record["loss"]
    return {"run": str(run), "config": config, "metrics": metrics, "loss": loss}


def find_runs(sweep: Path) -> list[Path]:
    runs = sorted({p.parent for p in sweep.rglob("config.yaml") if ".hydra" not in p.parts},
                  key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep).parts])
    if not runs:
        raise SystemExit(f"error: {sweep}: no run dirs (folders with a config.yaml) below it")
    return runs


def table(rows: list[dict], sweep: Path) -> tuple[list[str], list[str], list[list]]:
    """(swept keys, metric names, rows of values)."""
    keys = sorted({k for r in rows for k in r["config"]})
    swept = [k for k in keys if len({json.dumps(r["config"].get(k), default=str) for r in rows}) > 1]
    names = sorted({m for r in rows for m in r["metrics"]})
    body = [[str(Path(r["run"]).relative_to(sweep)) or ".", *(r["config"].get(k) for k in swept),
             *(r["metrics"].get(m) for m in names), r["loss"]] for r in rows]
    return swept, names, body


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], swept: list[str], x: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in swept if k != x]
    lines: dict[str, list[tuple]] = {}
    for r in rows:
        value = r["metrics"].get(metric) if metric != "loss" else r["loss"]
        if value is None or not isinstance(r["config"].get(x), (int, float)):
            continue
        label = ", ".join(f"{k}={fmt(r['config'].get(k))}" for k in others) or metric
        lines.setdefault(label, []).append((r["config"][x], value))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    xs = [p[0] for pts in lines.values() for p in pts]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def has_matplotlib() -> bool:
    """The plot's one dependency is an extra (`sweep`): the core install writes the table only."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a multirun directory (multirun/<stamp>)")
    ap.add_argument("--metric", help="metric to plot (default: the first nDCG@10, else Spearman; "
                    "'loss': the last training loss)")
    ap.add_argument("--x", help="swept key on the x axis (default: the first numeric swept key)")
    args = ap.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: {args.sweep}: not a directory", file=sys.stderr)
        return 2
    rows = [read_run(r) for r in find_runs(args.sweep)]
    swept, names, body = table(rows, args.sweep)
    header = ["run", *swept, *names, "final loss"]
    md = markdown(header, body)
    (args.sweep / "sweep.md").write_text(md)
    with open(args.sweep / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in row] for row in body])
    print(md, end="")
    numeric = [k for k in swept if all(isinstance(r["config"].get(k), (int, float)) for r in rows)]
    x = args.x or (numeric[0] if numeric else None)
    preferred = [m for suffix in ("ndcg@10", "spearman") for m in names if m.endswith(suffix)]
    metric = args.metric or (preferred or names or ["loss"])[0]
    if x is None:
        print("no numeric swept key: no plot (pass --x KEY)", file=sys.stderr)
        return 0
    if x not in swept:
        print(f"error: --x {x}: not a swept key; swept: {', '.join(swept) or 'none'}", file=sys.stderr)
        return 2
    if metric != "loss" and metric not in names:
        print(f"error: --metric {metric}: expected one of {', '.join([*names, 'loss'])}", file=sys.stderr)
        return 2
    if not has_matplotlib():
        print(f"no plot: matplotlib is missing (pip install -e '.[sweep]'); wrote {args.sweep / 'sweep.md'} "
              "and sweep.csv", file=sys.stderr)
        return 0
    plot(args.sweep / "sweep.png", rows, swept, x, metric)
    print(f"wrote {args.sweep / 'sweep.md'}, sweep.csv, sweep.png ({metric} against {x})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
