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
