"""Time from a preemption signal to the process's exit, with the signal landing in the middle of a long step.

    python tools/preempt_timing.py --dir /tmp/preempt [--batch 4096] [--into 0.5] [-- extra overrides]

Runs the quickstart (`python -m train`, one process, evaluation off) at --batch examples per step, waits
until step 1 is logged, then sends SIGUSR1 --into (a fraction) of step 1's duration into step 2, and
measures until the process exits. Prints one JSON line:

    step_s          step 1's duration (what a signal could have to wait for when a step runs to its end)
    signal_to_exit  seconds from the signal to the exit (give the step up + checkpoint step 1 + leave)
    given_up_after  seconds into step 2 when it was given up (from the run's own log line)
    to_given_up, to_checkpoint, to_exit_line   seconds from the signal until the run printed that it gave
                    the step up, that the checkpoint was complete, and that it exits (after the loop, the
                    data threads and the logs are closed); the rest of signal_to_exit is the interpreter's exit
    exit_code       143 expected
It also checks that the run stopped after step 1 with a complete checkpoint of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True, help="run dir (must not hold checkpoints)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--into", type=float, default=0.5, help="when in step 2 to signal, as a fraction of step 1")
    ap.add_argument("extra", nargs="*", help="more overrides for python -m train")
    args = ap.parse_args()

    run = args.dir
    cmd = [sys.executable, "-m", "train", "recipe=quickstart", f"trainer.batch_size={args.batch}", "eval=none",
           "trainer.max_steps=3", "trainer.log_every=1", "trainer.progress=false", f"hydra.run.dir={run}",
           *args.extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen: list[tuple[float, str]] = []  # (when, line) of the run's stderr

    def read() -> None:
        for line in p.stderr:
            seen.append((time.perf_counter(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics = run / "metrics.jsonl"
    while p.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        records = [json.loads(line) for line in lines]
        first = [r for r in records if r.get("step") == 1 and "seconds" in r]
        if first:
            break
        time.sleep(0.05)
    if p.poll() is not None:
        reader.join()
        sys.exit("the run ended before step 1 was logged:\n" + "".join(line for _, line in seen)[-3000:])
    step_s = first[0]["seconds"]
    time.sleep(args.into * step_s)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGUSR1)
    p.wait(timeout=3600)
    signal_to_exit = time.perf_counter() - t0
    reader.join()
    err = "".join(line for _, line in seen)

    def when(text: str) -> float | None:
        return next((round(t - t0, 2) for t, line in seen if t > t0 and text in line), None)
    given = re.search(r"step 2 given up at a chunk boundary after ([\d.]+) s", err)
    saved = run / "checkpoints" / "step-00000001" / "trainer.json"
    stopped = "stopped by SIGUSR1 after step 1" in err and saved.exists()
    print(json.dumps({"batch": args.batch, "step_s": round(step_s, 2), "signal_to_exit": round(signal_to_exit, 2),
                      "given_up_after": float(given.group(1)) if given else None,
                      "to_given_up": when("given up at a chunk boundary"), "to_checkpoint": when("checkpoint "),
                      "to_exit_line": when("to be requeued"),
                      "exit_code": p.returncode,
                      "stopped_after_step_1_with_its_checkpoint": stopped}))
    if p.returncode != 143 or not stopped:
        sys.exit(err[-3000:])


if __name__ == "__main__":
    main()
