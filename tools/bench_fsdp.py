"""FSDP2 with and without `dist.fsdp_keep_gathered`, side by side on 2 gloo ranks (issue 17, point 3).

    python tools/bench_fsdp.py --dir /tmp/bench_fsdp [--batch 64] [--chunk 4] [--steps 4] [--rounds 2]

Each round launches `torchrun --nproc_per_node 2 -m train recipe=quickstart dist=fsdp2 eval=none` twice
(all-MiniLM-L6-v2 on SNLI; first the default, then with dist.fsdp_keep_gathered=true), --batch examples a
step in chunks of --chunk per rank, and reads each step's seconds from metrics.jsonl (the first step, which
allocates the optimizer state, left out) and each launch's peak RSS per rank (the largest of the ranks'
VmHWM, polled from /proc while the launch runs). Prints one JSON object: per variant the step seconds of
every round, their median, the peak RSS, the final loss (equal in both: the same arithmetic), and the ratio
of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"default": [], "keep_gathered": ["dist.fsdp_keep_gathered=true"]}


def descendants(pid: int) -> list[int]:
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                todo += kids
                found += kids
        except OSError:
            continue
    return found


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def launch(run: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           "recipe=quickstart", "dist=fsdp2", "eval=none", f"trainer.batch_size={args.batch}",
           f"trainer.chunk_size={args.chunk}", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
           "trainer.progress=false", f"hydra.run.dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(run.parent / f"{run.name}.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)
        peak: dict[int, float] = {}
        while p.poll() is None:
            for pid in descendants(p.pid):
                peak[pid] = max(peak.get(pid, 0.0), vm_hwm_mib(pid))
            time.sleep(0.5)
    if p.returncode:
        sys.exit(f"{run}: torchrun exited {p.returncode}; see {run.parent / (run.name + '.log')}")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "seconds" in r]
    return {"step_s": [r["seconds"] for r in steps[1:]], "loss": steps[-1]["loss"],
            "peak_rss_mib": max(peak.values(), default=0.0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4, help="examples per forward on each rank (default 4)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for k in range(args.rounds):  # interleaved, so that the machine's load hits both alike
        for name, extra in VARIANTS.items():
            runs[name].append(launch(out / f"{name}-{k}", args, extra))
    report = {"batch": args.batch, "chunk": args.chunk, "steps": args.steps, "loadavg": os.getloadavg()}
    for name, rs in runs.items():
        secs = [s for r in rs for s in r["step_s"]]
        report[name] = {"step_s": secs, "median_step_s": statistics.median(secs),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "loss": [r["loss"] for r in rs]}
    report["keep_gathered_over_default"] = report["keep_gathered"]["median_step_s"] / report["default"]["median_step_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
