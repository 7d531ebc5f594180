"""Every recipe builds and runs a few steps with a tiny model, in process, through `run()`."""

from __future__ import annotations

import json

import pytest

from train.config import recipe_files
from train.run import run

TINY = ["model=tiny_bert", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.chunk_size=4", "trainer.log_every=1"]


def tiny_overrides(compose, name: str) -> list[str]:
    """The recipe with a tiny model, a few steps, and every evaluation task cut short."""
    cfg = compose([f"recipe={name}", *TINY])
    extra = [f"eval.tasks.{task}.limit=40" for task in cfg.eval.tasks]
    if cfg.data.path:
        extra.append("data.limit=64")
    extra += [f"data.sources.{s}.limit=64" for s in cfg.data.sources]
    return [f"recipe={name}", *TINY, *extra]


@pytest.mark.parametrize("name", sorted(recipe_files()))
def test_recipe_runs_a_few_steps(compose, tmp_path, name):
    cfg = compose(tiny_overrides(compose, name))
    result = run(cfg, tmp_path)
    assert result["after"] and all(v == v for v in result["after"].values()), "no evaluation figures"
    assert (tmp_path / "config.yaml").exists()
    if cfg.job == "train":
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert (tmp_path / "model" / "modules.json").exists()


def test_wandb_offline_needs_no_network(compose, tmp_path):
    cfg = compose([*TINY, "data.limit=64", "eval=none", "log.wandb=true", "log.wandb_mode=offline"])
    assert run(cfg, tmp_path)["after"] == {}
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
