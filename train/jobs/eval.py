"""job=eval (recipe=eval): the evaluators on a saved model or run dir, the encoding shared by the ranks;
with eval=mteb, the mteb package's tasks too (results in mteb's layout under <run dir>/mteb/)."""

from __future__ import annotations

from pathlib import Path

from train import mteb_eval
from train.atomic import atomic_folder, write_json, write_text
from train.build import Evaluation
from train.dist import World
from train.embed import embedder
from train.evaluate import run_tasks, side_by_side
from train.log import say


def run(job: Evaluation, world: World, run_dir: Path) -> dict:
    say(f"world size {world.size}: evaluating {job.model}")
    embed = embedder(job.encoder, world, job.batch_size)
    metrics = run_tasks(job.tasks, embed, job.dims) if job.tasks else {}
    if world.is_main and metrics:
        print(side_by_side(None, metrics))
        write_json(run_dir / "eval.json", {"model": job.model, "metrics": metrics})
    result = {"after": metrics}
    if job.mteb_tasks:
        result["mteb"] = run_mteb(job, embed, world, run_dir)
    return result


def run_mteb(job: Evaluation, embed, world: World, run_dir: Path) -> dict:
    """Every rank runs mteb over the shared embedding pass; rank 0 writes the results, into a temp
    folder renamed to <run dir>/mteb at the end (mteb writes its own files)."""
    name = "train/" + (Path(job.model).resolve().name if Path(job.model).exists() else job.model.replace("/", "__"))
    if not world.is_main:
        return mteb_eval.summary(mteb_eval.evaluate(job.mteb_tasks, embed, name, None, job.mteb_instructions))
    with atomic_folder(run_dir / "mteb") as tmp:
        s = mteb_eval.summary(mteb_eval.evaluate(job.mteb_tasks, embed, name, tmp, job.mteb_instructions))
        write_json(tmp / "summary.json", {"model": job.model, **s})
        write_text(tmp / "summary.txt", mteb_eval.table(s) + "\n")
    print(mteb_eval.table(s))
    return s
