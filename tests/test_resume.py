"""Checkpoints, exact resume and preemption, on real `python -m train` processes.

The reference is the same run never interrupted: a resumed run must log the same loss at every step
and save bit-identical weights (CPU), with two sources mixed, the gradient cache on (chunk 4 of 16)
and dropout on (its RNG replayed per chunk).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import arrow_store, checkpoint

STEPS = 90
RUN = ["model=tiny_bert", "trainer.batch_size=16", "trainer.chunk_size=4", "trainer.log_every=10",
       "data=snli_mix", "data.sources.pairs.limit=300", "data.sources.triples.limit=300", "eval=none",
       f"trainer.max_steps={STEPS}", "trainer.save_every=30", "trainer.keep_last=2", "trainer.progress=false"]


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "train", *RUN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def train(*args: str) -> subprocess.CompletedProcess:
    p = start(*args)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert different == [], different[:5]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    out = train(f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_checkpoints_are_complete_and_only_the_last_n_kept(reference):
    kept = [step for step, _ in checkpoint.listed(reference / "checkpoints")]
    assert kept == [30, 60]  # saved at 30 and 60 (not at the last step: the model is saved then); keep_last=2
    folder = reference / "checkpoints" / "step-00000060"
    meta = checkpoint.verify(folder)
    assert meta["step"] == 60 and meta["mixture"]["step"] == 60
    assert {"state.pt", "rng-rank0.pt", "trainer.json"} <= {p.name for p in folder.iterdir()}
    assert not list((reference / "checkpoints").glob(".tmp-*"))


def test_signal_stops_at_a_step_boundary_and_the_resumed_run_is_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    p = start(f"hydra.run.dir={run}")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # send the signal once training is under way
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    stopped = checkpoint.listed(run / "checkpoints")[-1][0]
    assert 3 <= stopped < STEPS and f"stopped by SIGUSR1 after step {stopped}" in err
    assert max(losses(run)) == stopped

    again = train(f"hydra.run.dir={run}", "trainer.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in again.stderr
    assert losses(run) == losses(reference)  # every step's loss, exactly
    assert_same_weights(run, reference)
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(f"step-{stopped:08d}")


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "model")
    state = run / "checkpoints" / "step-00000060" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a truncated write
    out = train(f"hydra.run.dir={run}", "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000060 is incomplete or corrupt (state.pt has" in out.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-00000030'} at step 30" in out.stderr
    assert losses(run) == losses(reference)
    assert_same_weights(run, reference)


def test_resume_with_another_batch_size_or_without_asking_is_refused(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    other = train(f"hydra.run.dir={run}", "trainer.resume=auto", "trainer.batch_size=32")
    assert other.returncode == 2
    assert "trainer.batch_size=16, this run has trainer.batch_size=32" in other.stderr.strip().splitlines()[-1]
    fresh = train(f"hydra.run.dir={run}")
    assert fresh.returncode == 2 and "already holds checkpoints (step-00000060)" in fresh.stderr
    assert not (run / "model").exists()


def test_run_record_names_commit_versions_and_data_hashes(reference):
    record = json.loads((reference / "run.json").read_text())
    assert record["versions"]["torch"] == torch.__version__
    assert record["git"] is None or len(record["git"]["commit"]) == 40
    pairs = record["data"]["pairs"]
    assert pairs["records"] == 300
    data = Path(pairs["origin"])
    assert pairs["size"] == data.stat().st_size and pairs["mtime_ns"] == data.stat().st_mtime_ns
    assert pairs["sampled_blake2b"] == arrow_store.fingerprint(data)["sampled_blake2b"]  # blocks, not the file
    assert "trainer.save_every=30" in record["command"] and (reference / "config.yaml").exists()


def test_a_data_file_changed_since_the_checkpoint_is_refused_naming_it(tmp_path):
    from train import record
    from train.data import read_source
    from train.errors import UserError

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "pos": f"p{i}"}) + "\n" for i in range(40)))
    saved = record.data_identity([read_source("main", str(path))])
    os.utime(path, ns=(1, 1))  # touched or copied: the same data, still resumable
    checkpoint.check_compatible(tmp_path / "ck", saved, record.data_identity([read_source("main", str(path))]))
    checkpoint.check_compatible(tmp_path / "ck", {}, saved)  # a checkpoint from before data files were recorded
    path.write_text(path.read_text().replace("q7", "q8"))
    now = record.data_identity([read_source("main", str(path))])
    with pytest.raises(UserError, match=f"the data file of source 'main' changed since the checkpoint was written "
                                        f"\\(then: {path}: .*; now: {path}: "):
        checkpoint.check_compatible(tmp_path / "ck", saved, now)


def test_sharded_checkpoints_on_another_world_size_are_refused_naming_the_way():
    from train.errors import UserError

    for strategy, hint in (("deepspeed", "ds_to_universal"), ("fsdp2", "not supported yet")):
        saved, now = {"dist.strategy": strategy, "world_size": 2}, {"dist.strategy": strategy, "world_size": 1}
        message = f"on 1 ranks: it was written by dist.strategy={strategy} on 2 ranks.*{hint}"
        with pytest.raises(UserError, match=message):
            checkpoint.check_compatible(Path("ck"), saved, now)
    checkpoint.check_compatible(Path("ck"), {"dist.strategy": "ddp", "world_size": 2},
                                {"dist.strategy": "ddp", "world_size": 1})


class FailingEngine:
    """Writes half a file, then fails the way a full disk does."""

    def __init__(self, world):
        self.world = world

    def save_state(self, folder: Path) -> None:
        (folder / "state.pt").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_leaves_the_previous_checkpoint_and_nothing_that_looks_valid(reference, tmp_path):
    from train.data import Mixture
    from train.dist import World
    from train.errors import UserError
    from train.trainer import FitConfig, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    cfg = FitConfig(max_steps=90, chunk_size=4, accum_steps=1, group_by_length=True, mask_duplicates=True,
                    log_every=1, eval_before=False, eval_every=0, eval_batch_size=8, keep_last=1)
    mixture = Mixture(sizes=[100], weights=[None], homogeneous=[False], batch_size=16)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint(FailingEngine(World()), mixture, 75, cfg, run, None)
    assert [s for s, _ in checkpoint.listed(run / "checkpoints")] == [30, 60]  # keep_last=1 not applied
    checkpoint.verify(run / "checkpoints" / "step-00000060")  # intact
    assert not (run / "checkpoints" / "step-00000075").exists()  # the half-written one is a .tmp- folder


def test_a_signal_is_handed_on_to_the_handler_installed_before():
    from train.preempt import Watch, hand_on

    seen = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with Watch(["SIGUSR2"]) as watch:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert watch.signum == signal.SIGUSR2 and seen == []  # ours only raised the flag
            previous = watch.previous[signal.SIGUSR2]
        hand_on(watch.signum, previous)
        assert seen == [signal.SIGUSR2]  # submitit's requeue handler would run here
    finally:
        signal.signal(signal.SIGUSR2, old)


# --- two ranks --------------------------------------------------------------------------------------

TWO = [*RUN[:-4], "trainer.max_steps=12", "trainer.save_every=4", "trainer.progress=false"]


def torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "train", *TWO, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_zero3"])
def test_two_ranks_resume_bit_identical(strategy, tmp_path):
    """2 gloo ranks: the run resumed from the reference's step-4 checkpoint (DDP: from a run that
    torchrun's SIGTERM stopped, both ranks at the same step) ends with the reference's losses and weights."""
    ref = tmp_path / "ref"
    out = finish(torchrun(f"dist={strategy}", f"hydra.run.dir={ref}"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (rank 1" in out.stderr
    run = tmp_path / "run"
    if strategy == "ddp":
        p = torchrun(f"dist={strategy}", f"hydra.run.dir={run}", "trainer.save_every=0", "trainer.log_every=1")
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both ranks
        stopped = finish(p)
        k = checkpoint.listed(run / "checkpoints")[-1][0]
        assert 2 <= k < 12 and stopped.stderr.count(f"stopped by SIGTERM after step {k}") == 1, stopped.stderr[-3000:]
        assert {f.name for f in (run / "checkpoints" / f"step-{k:08d}").iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt"}
    else:
        shutil.copytree(ref / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000004")
    out = finish(torchrun(f"dist={strategy}", f"hydra.run.dir={run}", "trainer.resume=auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    resumed = losses(run)
    assert resumed == {s: v for s, v in losses(ref).items() if s in resumed} and max(resumed) == 12
    assert_same_weights(run, ref)


def test_a_run_dir_that_cannot_be_written_is_one_error_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = train(f"hydra.run.dir={blocker / 'run'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: run dir {blocker / 'run'} is not writable: Not a directory"]


def test_lora_checkpoint_holds_the_adapter_only_and_resumes_bit_identical(tmp_path):
    """A decoder with LoRA (dropout on): the checkpoint keeps the trainable weights only (the frozen
    base comes from model.path again), and the resumed run still ends with the same merged model."""
    args = ["recipe=lora_llm", "data=lora_llm_offline", "model.path=${asset:tiny-llama}",
            "model.gradient_checkpointing=false", "eval.before=false", "eval.tasks.snli_sts.limit=20",
            "eval.tasks.snli_ir.limit=10", "trainer.max_steps=8", "trainer.save_every=4", "trainer.batch_size=8",
            "trainer.chunk_size=4", "data.sources.snli.limit=100", "trainer.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def lora_run(*extra):
        out = subprocess.run([sys.executable, "-m", "train", *args, *extra], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    ref, run = tmp_path / "ref", tmp_path / "run"
    lora_run(f"hydra.run.dir={ref}")
    saved = torch.load(ref / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)["model"]
    assert saved and all("lora_" in k for k in saved)
    shutil.copytree(ref / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000004")
    lora_run(f"hydra.run.dir={run}", "trainer.resume=auto")
    assert losses(run) == {s: v for s, v in losses(ref).items() if s > 4}
    assert_same_weights(run, ref)


def test_resume_on_another_world_size_ends_where_the_uninterrupted_run_does(tmp_path):
    """The global batch and the sampler do not depend on the world size, so a checkpoint taken on 2
    ranks resumes on 1 and the reverse (DDP). Dropout off (a copy of the tiny BERT with its dropout
    probabilities at 0): each rank's dropout stream cannot be carried over to another layout, and
    without dropout the step's gradient is the global batch's on any number of ranks."""
    from helpers import max_rel_diff

    from train import assets

    model = tmp_path / "tiny-bert"
    shutil.copytree(assets.path("tiny-bert"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    common = [f"model.path={model}", "dist=ddp"]

    def single(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "train", *TWO, *common, *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    one, two = tmp_path / "one", tmp_path / "two"
    runs = [single(f"hydra.run.dir={one}"), finish(torchrun(*common, f"hydra.run.dir={two}"))]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    for source, resume in ((two, single), (one, lambda *a: finish(torchrun(*common, *a)))):
        run = tmp_path / f"from-{source.name}"
        shutil.copytree(source / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000004")
        out = resume(f"hydra.run.dir={run}", "trainer.resume=auto")
        assert out.returncode == 0, out.stderr[-3000:]
        sizes = (2, 1) if source == two else (1, 2)
        assert f"(written on {sizes[0]} ranks, resumed on {sizes[1]})" in out.stderr
        for reference in (one, two):
            assert losses(run) == pytest.approx({s: v for s, v in losses(reference).items() if s > 4}, rel=1e-5)
            # Per tensor, relative to its largest entry with a floor (helpers.max_rel_diff): a tensor that
            # training leaves at ~0 (attention key biases) holds only rounding noise.
            worst = max_rel_diff(weights(run), weights(reference))
            assert worst < 1e-4, (source.name, reference.name, worst)
