"""Fault injection on 2 gloo ranks (DDP): a preemption signal mid-step on one rank, one rank SIGKILLed
mid-step, a corrupt latest checkpoint. After each the run is relaunched with trainer.resume=auto, and
the run ends with the losses and the weights of the same run never interrupted (bit-identical on CPU).
And a rank that fails inside DeepSpeed's own checkpoint save, out of step with the others.

The faults are injected from inside the ranks, at a chosen forward pass of a chosen rank (FAULT_AT), so
that where they land does not depend on the timing of a loaded machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from test_resume import assert_same_weights, losses

from train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model=tiny_bert", "trainer.batch_size=16", "trainer.chunk_size=4", "data=snli_mix",
       "data.sources.pairs.limit=300", "data.sources.triples.limit=300", "eval=none", "trainer.max_steps=6",
       "trainer.save_every=4", "trainer.keep_last=3", "trainer.log_every=1", "trainer.progress=false",
       "dist=ddp", "trainer.packing=off"]  # padded chunks: a known number of forwards per step
FORWARDS_PER_STEP = 4  # 8 examples a rank in chunks of 4: 2 forwards without gradient, 2 replayed

WORKER = Path(__file__).resolve().parent / "fault_worker.py"


def torchrun(stamp: Path, run: Path, *args: str, fault: str = "", **env: str
             ) -> tuple[subprocess.CompletedProcess, float]:
    """The launch's result, and the seconds from the fault (its time written to `stamp`) to torchrun's
    exit (0 without a fault)."""
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_AT": fault, "FAULT_STAMP": str(stamp), "PYTHONPATH": str(ROOT),
           **env}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(WORKER), *RUN, f"hydra.run.dir={run}", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    return out, time.time() - float(stamp.read_text()) if fault else 0.0


def complete(run: Path) -> list[int]:
    """The run dir's checkpoints, each verified complete (files all there at their written sizes)."""
    found = checkpoint.listed(run / "checkpoints")
    for _, folder in found:
        checkpoint.verify(folder)
    return [s for s, _ in found]


def test_signal_on_one_rank_a_killed_rank_and_a_corrupt_checkpoint_all_end_as_the_uninterrupted_run(tmp_path):
    stamp = tmp_path / "fault-time"
    reference = tmp_path / "reference"
    out, _ = torchrun(stamp, reference)
    assert out.returncode == 0, out.stderr[-3000:]

    # 1. SIGUSR1 reaches rank 1 alone, in step 3's second no-grad forward: both ranks give step 3 up at
    #    the same chunk boundary (the flag is agreed), step 2 is checkpointed, exit 143.
    run = tmp_path / "run"
    out, seconds = torchrun(stamp, run, fault=f"1:{2 * FORWARDS_PER_STEP + 1}:SIGUSR1")
    print(f"SIGUSR1 on rank 1 -> torchrun exited: {seconds:.1f} s")
    assert out.returncode != 0 and "exitcode  : 143" in out.stderr, out.stderr[-3000:]
    assert "step 3 given up at a chunk boundary" in out.stderr
    assert "stopped by a signal on another rank after step 2" in out.stderr  # rank 0 reports it
    assert complete(run) == [2] and max(losses(run)) == 2

    # 2. Resumed; rank 1 SIGKILLed in its 3rd step after the resume (step 5, after the checkpoint of 4)
    #    while rank 0 is busy in the same forward (3 s more), so that torchrun's SIGTERM reaches it there,
    #    under the preemption handler: rank 0's next collective with the dead rank fails and it leaves
    #    without waiting for rank 1 to leave the group (on main it waited until torchrun's SIGKILL, 30 s
    #    later), and nothing half-written is listed.
    out, seconds = torchrun(stamp, run, "trainer.resume=auto", fault=f"1:{2 * FORWARDS_PER_STEP + 1}:SIGKILL",
                            FAULT_SLOW=f"0:{2 * FORWARDS_PER_STEP + 1}:3")
    assert out.returncode != 0 and "Signal 9 (SIGKILL) received" in out.stderr, out.stderr[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", out.stderr), out.stderr[-3000:]  # named
    print(f"SIGKILL of rank 1 -> torchrun exited: {seconds:.1f} s")
    assert "forcefully exiting via 9" not in out.stderr, out.stderr[-3000:]  # rank 0 left by itself
    assert seconds < 29, seconds  # 3 s busy, the failing collective, the exit; torchrun's SIGKILL comes at 30 s
    assert complete(run) == [2, 4] and not (run / "model").exists()

    # 3. The latest checkpoint corrupt (a truncated state.pt): the relaunch falls back to step 2.
    state = run / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    out, _ = torchrun(stamp, run, "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000004 is incomplete or corrupt" in out.stderr and "at step 2" in out.stderr
    assert losses(run) == losses(reference)  # every step's loss, exactly
    assert_same_weights(run, reference)
    assert complete(run) == [2, 4, 6] and complete(reference) == [4, 6]  # keep_last=3; the new line's 4 and 6


def test_a_rank_failing_inside_deepspeeds_save_is_named_on_every_rank_within_the_collective_timeout(tmp_path):
    """ZeRO-3 on 2 ranks; rank 1 cannot write its optimizer partition inside DeepSpeed's save_checkpoint,
    so it skips DeepSpeed's closing barrier and the ranks' collectives fall out of step. Within the
    collective timeout (TRAIN_DIST_TIMEOUT_S, 20 s here) every rank left prints one error line naming
    rank 1's error (posted in the launcher's store); no checkpoint looks complete. On main: tracebacks
    of a gloo timeout, rank 1's error named nowhere."""
    stamp = tmp_path / "fault-time"
    run = tmp_path / "run"
    t0 = time.monotonic()
    out, _ = torchrun(stamp, run, "dist=deepspeed_zero3", "trainer.max_steps=2", "trainer.save_every=1",
                      FAULT_SAVE="1", TRAIN_DIST_TIMEOUT_S="20")
    seconds = time.monotonic() - t0
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines and all("rank 1: OSError: [Errno 28] No space left on device (injected)" in line
                         for line in lines), out.stderr[-3000:]
    assert lines[0].startswith("error: cannot write the checkpoint of step 1 into ")
    assert f'File "{ROOT / "train"}' not in out.stderr  # no traceback through the trainer (torchrun prints its own)
    assert complete(run) == [] and not (run / "model").exists()
    assert seconds < 240, seconds  # start-up, a step, the 20 s timeout, on a loaded machine
