"""Shared fixtures: offline environment, composed configs, tiny models from configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "TRAIN_DATA_CACHE" not in os.environ:  # the Arrow caches of test files, not in the user's cache
    os.environ["TRAIN_DATA_CACHE"] = tempfile.mkdtemp(prefix="train-data-cache-")
    atexit.register(shutil.rmtree, os.environ["TRAIN_DATA_CACHE"], True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist's `--dist loadgroup` (the README's test command): the tests that share a
    module-scoped fixture (a reference run, a trained model) go to one worker, so it is built once;
    every other test goes to whichever worker is free, so no long file holds one worker alone.
    Without xdist the mark does nothing."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for name in info.names_closure if info else ():
            defs = info.name2fixturedefs.get(name)
            if defs and defs[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}::{name}"))
                break


def pytest_configure(config):
    """Grouping fails silently: a worker that did not get the groups builds every shared fixture its
    tests need again (each 2-rank reference run twice on 2 workers, measured). pytest-xdist 3.8 writes
    a test's group into its id ("@group"), which pytest 9.2 no longer takes (pytest-xdist issue 1386;
    hence pytest 9.1 in constraints.txt): refuse that pair rather than run the suite at half speed."""
    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return  # without xdist (plain pytest) there is no option, and nothing to group
    import xdist

    if pytest.version_tuple[:2] >= (9, 2) and tuple(map(int, xdist.__version__.split(".")[:2])) <= (3, 8):
        raise pytest.UsageError(f"--dist loadgroup: pytest-xdist {xdist.__version__} ignores the tests' groups under "
                                f"pytest {pytest.__version__}; install the pytest of constraints.txt")


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the config `python -m train <overrides>` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train import config

    config.register()

    def _compose(overrides=(), hydra: bool = False):
        """hydra=True: with the `hydra` node (runtime choices), for HydraConfig.set_config."""
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)

    return _compose


@pytest.fixture(scope="session")
def tiny_encoder_factory(compose):
    """Fresh tiny encoders (2-layer BERT, MiniLM tokenizer) built through the model config."""
    from train.build import encoder as build_encoder

    def make(**model_overrides):
        overrides = ["model=tiny_bert"] + [f"model.{k}={v}" for k, v in model_overrides.items()]
        return build_encoder(compose(overrides).model)

    return make
