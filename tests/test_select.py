"""eval.every + eval.select: the best evaluated step is the saved model, and a preempted, resumed
run keeps the step it had chosen. Evaluation figures are planted (a sequence chosen here), the
models compared with runs stopped at the chosen step (constant learning rate, so a shorter run
takes the same steps)."""

from __future__ import annotations

import inspect
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from train import assets
from train.errors import UserError
from train.evaluate import Selection
from train.jobs import train as train_job
from train.preempt import Preempted
from train.run import run

METRIC = "snli_sts/spearman"
BASE = ["model=tiny_bert", f"model.path={assets.path('tiny-bert')}", "trainer.batch_size=8", "trainer.chunk_size=4",
        "trainer.log_every=1", "trainer.schedule=constant", "trainer.warmup_ratio=0", "data.limit=64",
        "eval.tasks.snli_sts.limit=20", "eval.tasks.snli_ir.limit=5", "eval.tasks.snli_ir.corpus_limit=300"]
SELECT = ["eval.every=2", f"eval.select={METRIC}"]


def test_selection_keeps_the_first_highest_step():
    s = Selection(METRIC)
    planted = {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.5, 10: 0.2}
    kept = [step for step, v in planted.items() if s.update(step, {METRIC: v, "other": -v})]
    assert kept == [2, 4] and (s.step, s.value, s.metrics) == (4, 0.5, {METRIC: 0.5, "other": -0.5})
    again = Selection(METRIC)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))  # as a checkpoint's JSON holds it
    assert not again.update(8, {METRIC: 0.5}) and again.step == 4
    with pytest.raises(UserError, match="the checkpoint selected by snli_sts/spearman"):
        Selection("snli_ir/ndcg@10").load_state_dict(s.state_dict())


@pytest.fixture
def planted(monkeypatch):
    """evaluate() returns values[step] for the step just trained (0: before training); at the step
    named in `signal_at`, a SIGUSR1 arrives during that evaluation (a preemption)."""
    now = {"step": 0}
    values: dict[int, float] = {}
    signal_at: set[int] = set()
    train_step = train_job._train_step

    def tracking(*args, **kwargs):
        now["step"] = inspect.signature(train_step).bind(*args, **kwargs).arguments["step"]
        return train_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        if now["step"] in signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {METRIC: values[now["step"]]}

    monkeypatch.setattr(train_job, "_train_step", tracking)
    monkeypatch.setattr(train_job, "evaluate", evaluate)

    def plant(v: dict[int, float], preempt_at: int | None = None) -> None:
        now["step"] = 0
        values.clear()
        values.update(v)
        signal_at.clear()
        signal_at.update({preempt_at} if preempt_at else set())

    return plant


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_step_is_the_model_and_the_last_is_kept_when_asked(compose, tmp_path, planted):
    planted({0: 0.1, 2: 0.3, 4: 0.6, 6: 0.4, 8: 0.5})
    result = run(compose([*BASE, *SELECT, "trainer.max_steps=8", "eval.keep_last=true"]), tmp_path / "sel")
    assert result["selected"]["step"] == 4 and result["selected"]["value"] == 0.6
    planted({0: 0.1, 2: 0.3, 4: 0.6})
    run(compose([*BASE, "trainer.max_steps=4"]), tmp_path / "ref4")
    planted({0: 0.1, 2: 0.3, 4: 0.6, 6: 0.4, 8: 0.5})
    run(compose([*BASE, "trainer.max_steps=8"]), tmp_path / "ref8")
    assert same(weights(tmp_path / "sel" / "model"), weights(tmp_path / "ref4" / "model"))
    assert same(weights(tmp_path / "sel" / "model-last"), weights(tmp_path / "ref8" / "model"))
    assert not same(weights(tmp_path / "ref4" / "model"), weights(tmp_path / "ref8" / "model"))
    evals = [(r["step"], r["eval"][METRIC]) for r in map(json.loads, (tmp_path / "sel" / "metrics.jsonl").open())
             if "eval" in r]
    assert evals == [(0, 0.1), (2, 0.3), (4, 0.6), (6, 0.4), (8, 0.5)]
    card = (tmp_path / "sel" / "model" / "README.md").read_text()
    assert "best (step 4)" in card and f"| `{METRIC}` | 0.1000 | 0.5000 | +0.4000 | 0.6000 |" in card


def test_a_preempted_run_resumes_with_the_same_selection(compose, tmp_path, planted):
    """Preempted at step 4 right after choosing it; the resumed run sees 0.4 and 0.5 at steps 6 and 8.
    Without the selection in the checkpoint it would start choosing afresh and save step 8."""
    cfg = [*BASE, *SELECT, "trainer.max_steps=8", "trainer.preempt_signals=[SIGUSR1]"]
    planted({0: 0.1, 2: 0.3, 4: 0.6}, preempt_at=4)
    with pytest.raises(Preempted, match="after step 4"):
        run(compose(cfg), tmp_path / "run")
    planted({6: 0.4, 8: 0.5})
    result = run(compose([*cfg, "trainer.resume=auto"]), tmp_path / "run")
    assert result["selected"]["step"] == 4
    planted({0: 0.1, 2: 0.3, 4: 0.6})
    run(compose([*BASE, "trainer.max_steps=4"]), tmp_path / "ref4")
    assert same(weights(tmp_path / "run" / "model"), weights(tmp_path / "ref4" / "model"))


@pytest.mark.parametrize("overrides, message", [
    ([f"eval.select={METRIC}"], "eval.select=snli_sts/spearman chooses among the evaluations during training: "
                                "set eval.every=N"),
    (["eval.every=2", "eval.select=snli_sts/pearson"], "eval.select=snli_sts/pearson: not a metric of the "
                                                       "evaluation tasks; expected one of snli_sts/spearman, "
                                                       "snli_ir/ndcg@10"),
    (["eval.keep_last=true"], "eval.keep_last=true saves the last step beside the selected one"),
])
def test_selection_settings_that_cannot_work_are_refused(compose, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run(compose([*BASE, "trainer.max_steps=2", *overrides]), tmp_path)
    assert not (tmp_path / "model").exists()


def test_the_dev_eval_config_runs_and_chooses_on_gcide(compose, tmp_path):
    cfg = compose([*BASE, "eval=dev", "trainer.max_steps=2", "eval.every=1", "eval.tasks.gcide_dev.limit=30"])
    assert (cfg.eval.tasks.gcide_dev.kind, cfg.eval.select) == ("pairs", "gcide_dev/ndcg@10")
    result = run(cfg, tmp_path)
    assert result["selected"]["step"] in (1, 2) and 0 < result["selected"]["value"] <= 1
    assert {"gcide_dev/ndcg@10", "snli_sts/spearman"} <= set(result["after"])
