"""The root: join the world, write the resolved config, build what the job needs, run the job.

    cfg --> dist.init_world --> build.<job>(cfg) --> jobs.<job>.run(built objects)

Nothing else happens here: the config becomes objects in train/build.py, and each job is a
function over those objects in train/jobs/.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from train import build, dist
from train.atomic import write_text
from train.jobs import eval as eval_job
from train.jobs import merge as merge_job
from train.jobs import mine as mine_job
from train.jobs import synthesize as synthesize_job
from train.jobs import train as train_job

JOBS = {
    "train": lambda cfg, world, run_dir: train_job.run(build.training(cfg, world, run_dir)),
    "eval": lambda cfg, world, run_dir: eval_job.run(build.evaluation(cfg, world), world, run_dir),
    "mine": lambda cfg, world, run_dir: mine_job.run(build.mine_inputs(cfg), world, run_dir),
    "merge": lambda cfg, world, run_dir: merge_job.run(build.merging(cfg, world, run_dir), world, run_dir),
    "synthesize": lambda cfg, world, run_dir: synthesize_job.run(build.synthesize_inputs(cfg, run_dir), world,
                                                                 run_dir),
}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    world = dist.init_world(str(cfg.trainer.device))
    build.seed_everything(cfg.seed + world.rank)  # dropout differs per rank; data order comes from cfg.seed alone
    if world.is_main:  # config.RunDirCheck has already refused a run dir that cannot be written
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    result = JOBS[str(cfg.job)](cfg, world, run_dir)
    # Every rank leaves together: a rank that is done early (the others while rank 0 writes) would
    # otherwise tear its end of the process group down under rank 0, which can abort the launch.
    dist.barrier()
    return result
