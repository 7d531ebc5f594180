"""`python -m train [recipe=NAME] [overrides]`: compose the config with Hydra and run the job.

Hydra config search path: conf/ (building blocks) with recipes/*.yaml registered as the
`recipe` group. Under torchrun every rank would pick its own timestamped run dir, so the
process group is joined first and rank 0's timestamp is shared (TRAIN_RUN_STAMP).
A `UserError` is printed as one line with exit status 2; TRAIN_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _share_run_stamp() -> None:
    if "TRAIN_RUN_STAMP" in os.environ:
        return
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from train import dist

        dist.init_process_group()
        stamp = dist.broadcast_object(stamp)
        if dist.rank() > 0:
            # Only rank 0 writes Hydra's files and logs into the shared run dir.
            sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    os.environ["TRAIN_RUN_STAMP"] = stamp


def _user_error(e: BaseException, kind: type) -> BaseException | None:
    """The UserError behind `e`, if any (OmegaConf wraps errors raised inside resolvers)."""
    while e is not None:
        if isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from train import config
    from train.errors import UserError

    config.register()
    _share_run_stamp()

    @hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg: DictConfig) -> None:
        from transformers.utils import logging as hf_logging

        from train.preempt import Preempted, hand_on
        from train.run import run

        hf_logging.disable_progress_bar()
        failed: list[Exception] = []
        try:
            run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except Preempted as p:
            # Checkpoint complete on every rank: leave the group, let a launcher's own handler act
            # (submitit requeues from rank 0), and exit with the code the SLURM script requeues on.
            if os.environ.get("RANK", "0") == "0":
                print(f"train: {p}; exiting with {cfg.trainer.preempt_exit_code} to be requeued", file=sys.stderr,
                      flush=True)
            from train import dist

            dist.shutdown()
            hand_on(p.signum, p.previous)
            # Out now, without the interpreter's teardown: everything kept is written and fsynced, and
            # freeing the model and the data took most of the time from signal to exit (tools/
            # preempt_timing.py: 11 of 15 s at batch 64 on a loaded 2-core machine), time the grace
            # period does not have.
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(cfg.trainer.preempt_exit_code)
        except Exception as e:
            user_error = _user_error(e, UserError)
            if user_error is None or os.environ.get("TRAIN_DEBUG"):
                # Not agreed on (a UserError is, on every rank): often a collective that failed because
                # a peer died. Waiting for every rank to leave would wait for the dead one, until
                # torchrun's SIGKILL 30 s later (tools/fault_drill.py measured it: rank 1 SIGKILLed, rank 0
                # stayed 30 s).
                failed.append(e)
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            from train import dist

            dist.shutdown(wait=not failed)

    task()


if __name__ == "__main__":
    main()
