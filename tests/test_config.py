"""Config composition: recipes, schemas, precedence, help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from train.config import recipe_files
from train.run import JOBS


def test_every_recipe_composes(compose):
    names = sorted(recipe_files())
    assert {"quickstart", "eval"} <= set(names)
    for name in names:
        cfg = compose([f"recipe={name}"])
        assert cfg.job in JOBS


def test_default_is_the_quickstart(compose):
    default, quick = compose([]), compose(["recipe=quickstart"])
    assert default == quick
    assert default.trainer.max_steps == 120
    assert default.data.path.endswith("snli/train_triples.jsonl")


def test_command_line_beats_recipe_beats_base(compose):
    assert compose([]).trainer.max_steps == 120  # the recipe's value over trainer/default.yaml's 100
    assert compose(["trainer.max_steps=7"]).trainer.max_steps == 7
    assert compose(["model=tiny_bert"]).model.max_length == 32  # the recipe sets it after the group
    assert compose(["model=tiny_bert", "model.max_length=16"]).model.max_length == 16


@pytest.mark.parametrize("key, wrong, allowed", [
    ("model.pooling", "maen", "mean, cls, last, latent, echo"),
    ("model.dtype", "fp16", "float32, bfloat16, float16, float64"),
    ("trainer.precision", "fp16", "auto, bf16, fp32"),
    ("trainer.device", "gpu", "auto, cpu, cuda"),
    ("trainer.schedule", "cosin", "linear, cosine, constant"),
    ("trainer.packing", "yes", "auto, on, off"),
    ("dist.strategy", "fsdp", "auto, ddp, fsdp2, deepspeed"),
    ("mine.format", "csv", "jsonl, parquet, datasets"),
    ("merge.method", "average", "linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, lora"),
    ("merge.search", "random", "none, grid, gradient"),
    ("job", "serve", "train, eval, mine, merge, synthesize"),
])
def test_a_wrong_choice_fails_at_compose_time_naming_the_key_and_the_choices(compose, key, wrong, allowed):
    with pytest.raises(ConfigCompositionException) as e:
        compose([f"{key}={wrong}"])
    text = f"{e.value} {e.value.__cause__}"
    assert f"Invalid value '{wrong}', expected one of [{allowed}]" in text and key in text


def test_a_wrong_choice_on_the_command_line_names_the_key_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "model.pooling=maen", "--cfg", "job"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert "model.pooling" in out.stderr and "expected one of [mean, cls, last, latent, echo]" in out.stderr


def test_typos_and_wrong_types_fail_at_compose_time_naming_the_key(compose):
    with pytest.raises(ConfigCompositionException) as typo:
        compose(["trainer.max_stpes=5"])
    cause = typo.value.__cause__
    assert isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "max_stpes" in str(cause)
    with pytest.raises(ConfigCompositionException) as wrong:
        compose(["trainer.batch_size=abc"])
    assert isinstance(wrong.value.__cause__, ValidationError) and "trainer.batch_size" in str(wrong.value.__cause__)


def test_help_lists_recipes_and_groups():
    out = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    recipes = next(line for line in out.stdout.splitlines() if line.startswith("recipe:"))
    assert all(name in recipes for name in recipe_files())
    for group in ("model:", "data:", "dist:", "eval:", "loss:", "optim:", "trainer:"):
        assert group in out.stdout


def test_the_optimizer_check_leaves_the_runs_random_streams_alone(compose):
    """build.check_optim builds a stand-in layer before any model loads; its initialisation must not
    move torch's generator, or every run's dropout masks (and figures) shift with the check."""
    import torch

    from train import build

    cfg = compose([])
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    build.check_optim(cfg.optim, cfg.trainer)
    assert torch.equal(torch.rand(4), want)


def test_prompts_from_the_command_line_reach_the_encoder_and_bad_ones_are_named(compose):
    """A dict given on the command line onto the unset default (OmegaConf 2.3 fails to merge a dict into
    a None Optional[Dict] node: AttributeError at compose time, as README's prompted rows once found)."""
    from train.build import prompts
    from train.errors import UserError

    cfg = compose(['model.prompts={query: "query: ", passage: "passage: "}'])
    assert prompts(cfg.model.prompts) == {"query": "query: ", "passage": "passage: "}
    assert prompts(compose([]).model.prompts) is None
    e5 = compose(["recipe=e5_pretrain", 'model.prompts={query: "q: "}'])  # merged onto the recipe's pair
    assert prompts(e5.model.prompts) == {"query": "q: ", "passage": "passage: "}
    for bad in ("model.prompts=query", "model.prompts=[a,b]", "model.prompts={query: 3}"):
        with pytest.raises(UserError, match="model.prompts=.*expected a mapping of side to prefix"):
            prompts(compose([bad]).model.prompts)
