"""job=eval (recipe=eval): the evaluators on a saved model or run dir, the encoding shared by the ranks."""

from __future__ import annotations

from pathlib import Path

from train.atomic import write_json
from train.build import Evaluation
from train.dist import World
from train.embed import embedder
from train.evaluate import run_tasks, side_by_side
from train.log import say


def run(job: Evaluation, world: World, run_dir: Path) -> dict:
    say(f"world size {world.size}: evaluating {job.model}")
    metrics = run_tasks(job.tasks, embedder(job.encoder, world, job.batch_size), job.dims)
    if world.is_main:
        print(side_by_side(None, metrics))
        write_json(run_dir / "eval.json", {"model": job.model, "metrics": metrics})
    return {"after": metrics}
