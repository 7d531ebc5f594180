"""`python -m train` under torchrun, with faults injected from inside a rank (tests/test_faults.py,
tests/test_resume.py), so that where they land does not depend on the timing of a loaded machine.

    FAULT_AT=R:N:SIG    rank R sends itself signal SIG from inside its N-th forward pass (from 0), after
                        writing the time to the file FAULT_STAMP
    FAULT_SLOW=R:N:S    rank R spends S more seconds in its N-th forward pass (busy when a peer dies)
    FAULT_SAVE=R        rank R cannot write its ZeRO optimizer files (a full disk, inside DeepSpeed's save)
"""

import os
import signal
import sys
import time

from train import engines


def at_forward(at: int, fault) -> None:
    """fault() runs in this rank's `at`-th forward pass (from 0), under every engine."""
    for engine in (engines.TorchEngine, engines.DeepSpeedEngine):  # FSDP2Engine inherits TorchEngine's
        forward, calls = engine.forward, [0]

        def faulty(self, *inputs, forward=forward, calls=calls):
            if calls[0] == at:
                fault()
            calls[0] += 1
            return forward(self, *inputs)

        engine.forward = faulty


def send_signal(name: str) -> None:
    with open(os.environ["FAULT_STAMP"], "w") as f:  # when it struck
        f.write(repr(time.time()))
    os.kill(os.getpid(), getattr(signal, name))


def failing_zero_save() -> None:
    import torch

    save = torch.save

    def failing(obj, f, *a, **k):
        if "optim_states" in str(f):
            raise OSError(28, "No space left on device (injected)")
        return save(obj, f, *a, **k)

    torch.save = failing


if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    if os.environ.get("FAULT_AT"):
        r, n, sig = os.environ["FAULT_AT"].split(":")
        if r == rank:
            at_forward(int(n), lambda: send_signal(sig))
    if os.environ.get("FAULT_SLOW"):
        r, n, seconds = os.environ["FAULT_SLOW"].split(":")
        if r == rank:
            at_forward(int(n), lambda: time.sleep(float(seconds)))  # the signal handler does not cut it short
    if os.environ.get("FAULT_SAVE") == rank:
        failing_zero_save()
    sys.argv = ["train", *sys.argv[1:]]
    from train.__main__ import main

    main()
