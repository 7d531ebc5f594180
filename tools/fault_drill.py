"""The fault drill: the quickstart on 2 ranks, stopped three ways, ends with the uninterrupted run's model.

    python tools/fault_drill.py --dir /tmp/drill [--batch 128] [--steps 8] [--save-every 3] [-- extra overrides]

Runs `torchrun --nproc_per_node 2 -m train recipe=quickstart` (all-MiniLM-L6-v2 on SNLI, gloo, DDP,
evaluation off) at --batch examples a step (the recipe's chunk of 16: several chunks a rank, so a signal
lands between chunk boundaries), first once uninterrupted (reference/), then in run/:

  a. SIGTERM to torchrun (which passes it on to both ranks) half a step into step 3: the step is given up
     at its next chunk boundary (or, landing in the last chunk, finished), the last finished step is
     checkpointed, every rank exits 143;
  b. relaunched with trainer.resume=auto; rank 1 (found by its RANK among torchrun's children) SIGKILLed
     half a step after the checkpoint of step 2 x save_every is complete: torchrun ends the job naming it;
  c. the latest checkpoint's state.pt truncated to half; relaunched: it falls back to the one before and
     trains to the end.

Then compares run/ with reference/: every step's logged loss (the global mean over ranks) and every saved
weight (model/model.safetensors), as the largest relative difference (per tensor, |a - b| / max|b|), and
whether they are bit-identical. Prints one JSON line with those and the seconds from each signal to
torchrun's exit; exits 1 if anything differs by more than 1e-6 relative or a stage went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6


def launch(run: Path, args: argparse.Namespace, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           "recipe=quickstart", "dist=ddp", "eval=none", f"trainer.batch_size={args.batch}",
           f"trainer.max_steps={args.steps}", f"trainer.save_every={args.save_every}", "trainer.keep_last=2",
           "trainer.log_every=1", "trainer.progress=false", f"hydra.run.dir={run}", *args.extra, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(run.parent / f"{run.name}-{len(list(run.parent.glob(run.name + '-*.log')))}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_seconds(run: Path, step: int) -> float | None:
    found = [r["seconds"] for r in records(run) if r.get("step") == step and "seconds" in r]
    return found[-1] if found else None


def wait_for(p: subprocess.Popen, ready, what: str, timeout: float = 1800):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ready()
        if got:
            return got
        if p.poll() is not None:
            sys.exit(f"the run ended (code {p.returncode}) before {what}")
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def rank_pid(torchrun: int, rank: int) -> int:
    """The pid of `rank` among torchrun's descendants (by the RANK in its environment)."""
    todo, seen = [torchrun], []
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            todo += [int(c) for c in children]
            seen += [int(c) for c in children]
    for pid in seen:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:  # entries: RANK=, not LOCAL_RANK= or GROUP_RANK=
            return pid
    sys.exit(f"no process of rank {rank} under torchrun ({torchrun})")


def log_text(run: Path, i: int) -> str:
    return (run.parent / f"{run.name}-{i}.log").read_text()


def compare(run: Path, reference: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    def losses(r: Path) -> dict[int, float]:
        return {x["step"]: x["loss"] for x in records(r) if "loss" in x}

    la, lb = losses(run), losses(reference)
    wa, wb = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert la.keys() == lb.keys() and wa.keys() == wb.keys(), (sorted(la), sorted(lb))
    loss_rel = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in lb)
    weight_rel = max(float((wa[k].float() - wb[k].float()).abs().max() / wb[k].float().abs().max().clamp_min(1e-12))
                     for k in wb)
    return {"steps_compared": len(lb), "last_loss": [la[max(la)], lb[max(lb)]], "loss_max_rel_diff": loss_rel,
            "weights_compared": len(wb), "weight_max_rel_diff": weight_rel,
            "bit_identical": la == lb and all(torch.equal(wa[k], wb[k]) for k in wb)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True, help="an empty folder for the two runs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="more overrides for python -m train")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    reference, run = args.dir / "reference", args.dir / "run"
    result: dict = {"batch": args.batch, "steps": args.steps, "save_every": args.save_every}

    t0 = time.perf_counter()
    p = launch(reference, args)
    if p.wait() != 0:
        sys.exit(log_text(reference, 0)[-3000:])
    result["reference_s"] = round(time.perf_counter() - t0, 1)

    # a. SIGTERM to torchrun half a step into step 3
    p = launch(run, args)
    took = wait_for(p, lambda: step_seconds(run, 2), "step 2 was logged")
    time.sleep(took / 2)
    sent = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    code = p.wait()
    result["sigterm_to_exit_s"] = round(time.perf_counter() - sent, 2)
    said = log_text(run, 0)
    stopped = [int(s) for s in re.findall(r"stopped by SIGTERM after step (\d+)", said)]
    result["sigterm"] = {"given_up": "given up at a chunk boundary" in said, "checkpointed_step": max(stopped or [0]),
                         "torchrun_exit_code": code}
    if not stopped:
        sys.exit("a: the run did not report stopping on SIGTERM:\n" + said[-3000:])

    # b. resumed; rank 1 SIGKILLed half a step after the checkpoint of step 2 x save_every
    p = launch(run, args, "trainer.resume=auto")
    target = 2 * args.save_every
    wait_for(p, lambda: (run / "checkpoints" / f"step-{target:08d}" / "trainer.json").exists(),
             f"the checkpoint of step {target}")
    time.sleep((step_seconds(run, target) or took) / 2)
    victim = rank_pid(p.pid, 1)
    sent = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    p.wait()
    result["sigkill_rank1_to_exit_s"] = round(time.perf_counter() - sent, 2)
    said = log_text(run, 1)
    result["sigkill"] = {"exit_code": p.returncode, "rank_named": "Signal 9 (SIGKILL) received" in said,
                         "checkpoints_left": [k for k, _ in checkpoint.listed(run / "checkpoints")],
                         "model_written": (run / "model").exists()}

    # c. the latest checkpoint corrupt; relaunched to the end
    latest = checkpoint.listed(run / "checkpoints")[-1][1] / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    p = launch(run, args, "trainer.resume=auto")
    if p.wait() != 0:
        sys.exit(log_text(run, 2)[-3000:])
    said = log_text(run, 2)
    result["corrupt"] = {"truncated": latest.parent.name, "fell_back": "is incomplete or corrupt" in said,
                         "resumed": next((line.strip() for line in said.splitlines() if "resumed from" in line), None)}

    result.update(compare(run, reference))
    print(json.dumps(result))
    ok = (result["sigterm"]["checkpointed_step"] and not result["sigkill"]["model_written"]
          and result["corrupt"]["fell_back"] and result["loss_max_rel_diff"] <= TOLERANCE
          and result["weight_max_rel_diff"] <= TOLERANCE)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
