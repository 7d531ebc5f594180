"""Preemption: a signal asks the run to stop at the next chunk boundary, checkpoint, and exit.

SLURM sends `--signal=USR1@<s>` (launch/slurm.sbatch) ahead of the time limit or a preemption, and SIGTERM
when it ends a job; submitit (the Hydra launcher in conf/hydra/launcher/) sends SIGUSR2. The handler only
raises a flag. Every rank polls it at every chunk boundary of the gradient cache (any rank's flag stops
all of them at the same boundary): the step in progress is given up (gradcache.Abandoned; its gradients
discarded, its RNG and data position put back) and the last finished step is checkpointed, so the wait
is one chunk, not the rest of a step that may take minutes. An engine that cannot discard a partial step
(ZeRO 1/2 with per-chunk reduction: engines.py) and a one-chunk step stop at the end of the step instead. Then the loop
raises `Preempted`. The entry point then hands the signal on to the
handler that was installed before ours (submitit's requeues the job from rank 0) and exits with
`trainer.preempt_exit_code` (default 143, what a shell reports for SIGTERM: the sbatch requeues on it, and
so does a cluster with `RequeueExit=143`). A second signal while stopping is ignored: the checkpoint
is being written.
"""

from __future__ import annotations

import signal
from typing import Callable


class Preempted(Exception):
    def __init__(self, step: int, signum: int, checkpoint: str, previous: object = None):
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}")
        self.step, self.signum, self.checkpoint, self.previous = step, signum, checkpoint, previous


class Watch:
    """Installs the handlers for `names` (e.g. ["SIGTERM", "SIGUSR1"]) while in use; `.signum` is the
    first signal caught (0 while none)."""

    def __init__(self, names: list[str]):
        self.signals = []
        for name in names:
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
            if not isinstance(sig, signal.Signals):
                from train.errors import UserError

                raise UserError(f"trainer.preempt_signals: unknown signal {name!r}; expected names such as "
                                "SIGTERM, SIGUSR1, SIGUSR2")
            self.signals.append(sig)
        self.signum = 0
        self.previous: dict[int, object] = {}

    def _caught(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum

    def __enter__(self) -> Watch:
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._caught)
            except ValueError:  # not the main thread (an embedding application): no preemption handling
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def hand_on(signum: int, previous: object) -> None:
    """Call the handler that was installed before ours (submitit's requeue), if it was a Python one."""
    if isinstance(previous, Callable) and previous not in (signal.default_int_handler,):
        previous(signum, None)
