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
    assert kept == [60, 90]  # saved at 30, 60 and at the last step, before the final evaluation; keep_last=2
    folder = reference / "checkpoints" / "step-00000060"
    meta = checkpoint.verify(folder)
    assert meta["step"] == 60 and meta["mixture"]["step"] == 60
    assert {"state.pt", "rng-rank0.pt", "trainer.json"} <= {p.name for p in folder.iterdir()}
    assert not list((reference / "checkpoints").glob(".tmp-*"))


def test_a_signal_stops_the_run_and_the_resumed_run_is_bit_identical(reference, tmp_path):
    """SIGUSR1 from outside at a time the test does not control: mid-step it gives the step up (the
    checkpoint is of the step before), between steps it checkpoints that step; either way the resumed
    run logs the same losses and saves the same weights as the reference."""
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
    state = run / "checkpoints" / "step-00000090" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a truncated write
    out = train(f"hydra.run.dir={run}", "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000090 is incomplete or corrupt (state.pt has" in out.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-00000060'} at step 60" in out.stderr
    assert losses(run) == losses(reference)
    assert_same_weights(run, reference)


def test_resume_with_another_batch_size_or_without_asking_is_refused(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    other = train(f"hydra.run.dir={run}", "trainer.resume=auto", "trainer.batch_size=32")
    assert other.returncode == 2
    assert "trainer.batch_size=16, this run has trainer.batch_size=32" in other.stderr.strip().splitlines()[-1]
    fresh = train(f"hydra.run.dir={run}")
    assert fresh.returncode == 2 and "already holds checkpoints (step-00000090)" in fresh.stderr
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


def test_zero_checkpoints_on_another_world_size_are_refused_naming_the_way():
    from train.errors import UserError

    saved, now = {"dist.strategy": "deepspeed", "world_size": 2}, {"dist.strategy": "deepspeed", "world_size": 1}
    message = "on 1 ranks: it was written by dist.strategy=deepspeed on 2 ranks.*ds_to_universal"
    with pytest.raises(UserError, match=message):
        checkpoint.check_compatible(Path("ck"), saved, now)
    for strategy in ("ddp", "fsdp2"):  # whole, or resharded by torch.distributed.checkpoint on load
        checkpoint.check_compatible(Path("ck"), {"dist.strategy": strategy, "world_size": 2},
                                    {"dist.strategy": strategy, "world_size": 1})


class FailingEngine:
    """Writes half a file, then fails the way a full disk does."""

    def __init__(self, world):
        self.world = world

    def save_state(self, folder: Path) -> None:
        (folder / "state.pt").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_leaves_the_previous_checkpoint_and_nothing_that_looks_valid(reference, tmp_path):
    from train.build import FitConfig
    from train.data import Mixture
    from train.dist import World
    from train.errors import UserError
    from train.jobs.train import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    cfg = FitConfig(max_steps=90, chunk_size=4, accum_steps=1, group_by_length=True, mask_duplicates=True,
                    log_every=1, eval_before=False, eval_every=0, eval_batch_size=8, keep_last=1)
    mixture = Mixture(sizes=[100], weights=[None], homogeneous=[False], batch_size=16)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint(FailingEngine(World()), mixture, 75, cfg, run, None)
    assert [s for s, _ in checkpoint.listed(run / "checkpoints")] == [60, 90]  # keep_last=1 not applied
    checkpoint.verify(run / "checkpoints" / "step-00000090")  # intact
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


def torchrun(*args: str, fault: str = "") -> subprocess.Popen:
    """`python -m train` on 2 ranks; fault="R:N:SIG": rank R sends itself SIG in its N-th forward (fault_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_AT": fault, "FAULT_STAMP": os.devnull}
    main = [str(Path(__file__).resolve().parent / "fault_worker.py")] if fault else ["-m", "train"]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *main, *TWO, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_zero3"])
def test_two_ranks_resume_bit_identical(strategy, tmp_path):
    """2 gloo ranks: a stopped run, resumed, ends with the uninterrupted reference's losses and weights.
    DDP: stopped by torchrun's SIGTERM (both ranks at the same step, wherever it lands). FSDP2 and ZeRO-3:
    SIGUSR1 on rank 1 alone, in step 6's first replayed forward, so that both ranks give step 6 up with one
    chunk's gradient accumulated in the engine (FSDP2: unsharded in its parameter state; ZeRO-3: inside
    the coalescing block) and checkpoint step 5. On main these ran step 6 to its end."""
    ref = tmp_path / "ref"
    out = finish(torchrun(f"dist={strategy}", f"hydra.run.dir={ref}", "trainer.keep_last=3"))  # 4, 8 and 12
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
    else:  # 8 examples a rank in chunks of 4: 2 forwards without gradient then 2 replayed per step
        stopped = finish(torchrun(f"dist={strategy}", f"hydra.run.dir={run}", fault=f"1:{5 * 4 + 2}:SIGUSR1"))
        assert "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
        assert stopped.stderr.count("step 6 given up at a chunk boundary") == 1  # rank 0 logs
        assert "stopped by a signal on another rank after step 5" in stopped.stderr  # rank 0 heard of it
        assert checkpoint.listed(run / "checkpoints")[-1][0] == 5 and max(losses(run)) == 5
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
            "eval.tasks.snli_ir.limit=10", "eval.tasks.snli_ir.corpus_limit=300", "trainer.max_steps=8",
            "trainer.save_every=4", "trainer.batch_size=8",
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


# --- lineage: a resume continues one line of checkpoints ---------------------------------------------


def fit_in_process(run: Path, resume: str | None, max_steps: int, save_every: int, keep_last: int,
                   tasks: list | None = None, signals: tuple[str, ...] = (), on_engine=None) -> str:
    """trainer.fit on the tiny BERT, in this process: what `python -m train` runs, minus its start-up.
    on_engine(engine): called with the engine before fit (to instrument it). Returns what the run printed."""
    import contextlib
    import io

    from helpers import LOSS, plain_engine, snli_source, tiny_encoder

    from train.build import FitConfig
    from train.data import Mixture
    from train.jobs.train import fit
    from train.log import Logger

    torch.manual_seed(0)
    run.mkdir(parents=True, exist_ok=True)
    engine = plain_engine(tiny_encoder().train())
    if on_engine:
        on_engine(engine)
    mixture = Mixture(sizes=[64], weights=[None], homogeneous=[False], batch_size=8, seed=0)
    cfg = FitConfig(max_steps=max_steps, chunk_size=4, accum_steps=1, group_by_length=True, mask_duplicates=True,
                    log_every=1, eval_before=False, eval_every=0, eval_batch_size=8, save_every=save_every,
                    keep_last=keep_last, resume_from=checkpoint.candidates(resume, run),
                    preempt_signals=list(signals), identity={"world_size": 1})  # the RNG is restored on 1 rank
    logger, said = Logger(run, True, max_steps, progress=False), io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            fit(engine, mixture, [snli_source(64)], LOSS, tasks or [], logger, cfg, run)
    finally:
        logger.close()
    return said.getvalue()


def steps(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.listed(run / "checkpoints")]


def test_a_fallback_past_a_corrupt_checkpoint_keeps_the_new_line(tmp_path):
    """Checkpoints 2, 4, 6 with 6 corrupt: the resumed run falls back to 4 and, with keep_last=1, saves
    at 5 and at its end, 6. On main the save at 5 deleted itself and kept the corrupt 6 (no final
    checkpoint replaced it), so the next resume found nothing that loads. max_steps differs between
    these in-process runs only to end them where the scenario needs (fit_in_process checks no settings)."""
    run = tmp_path / "run"
    fit_in_process(run, None, max_steps=7, save_every=2, keep_last=0)
    shutil.rmtree(run / "checkpoints" / "step-00000007", ignore_errors=True)  # as if stopped after step 6
    assert steps(run) == [2, 4, 6]
    state = run / "checkpoints" / "step-00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    said = fit_in_process(run, "auto", max_steps=6, save_every=5, keep_last=1)
    assert "step-00000006 is incomplete or corrupt" in said and "at step 4" in said
    assert "set aside abandoned-step-00000006-resumed-at-00000004" in said
    assert steps(run) == [6]
    checkpoint.verify(run / "checkpoints" / "step-00000006")  # the new line's 6, complete
    assert not list((run / "checkpoints").glob("abandoned-*"))  # the corrupt 6 went once the new 6 existed
    said = fit_in_process(run, "auto", max_steps=6, save_every=5, keep_last=1)
    assert f"resumed from {run / 'checkpoints' / 'step-00000006'} at step 6" in said


def test_resume_auto_after_an_explicit_resume_continues_that_line(tmp_path):
    """trainer.resume=.../step-2 while 4 and 6 exist, stopped after step 4; a requeue with
    resume=auto must continue from the new 4, not go back to the abandoned 6 (as it did on main)."""
    run = tmp_path / "run"
    fit_in_process(run, None, max_steps=7, save_every=2, keep_last=0)
    assert {2, 4, 6} <= set(steps(run))
    fit_in_process(run, str(run / "checkpoints" / "step-00000002"), max_steps=4, save_every=3, keep_last=2)
    assert steps(run) == [3, 4]
    assert [p.name for p in sorted((run / "checkpoints").glob("abandoned-*"))][0] == (
        "abandoned-step-00000006-resumed-at-00000002")
    said = fit_in_process(run, "auto", max_steps=7, save_every=3, keep_last=2)
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'} at step 4" in said
    assert steps(run) == [6, 7]  # the new line's 6 and 7 replaced the abandoned ones, which are gone now
    assert not list((run / "checkpoints").glob("abandoned-*"))


def test_a_signal_during_the_final_evaluation_is_a_preemption_and_the_requeue_only_finishes(tmp_path):
    """The run ends with a checkpoint at max_steps; SIGUSR1 during the final evaluation stops it there
    (on main the handlers were gone by then: the signal's default action killed the job, with no
    model and no checkpoint of the last steps), and the requeued run trains no step, evaluates and
    saves the same model as a run that was never stopped."""
    from train.preempt import Preempted

    class SignalDuringEval:  # an evaluation task that is interrupted by the scheduler
        name = "probe"

        def __init__(self, send: bool):
            self.send = send

        def __call__(self, embed):
            embed(["a dog runs"], None)
            if self.send:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.05)
            return {"x": 1.0}

    reference = tmp_path / "reference"
    fit_in_process(reference, None, max_steps=5, save_every=0, keep_last=1, tasks=[SignalDuringEval(False)],
                   signals=("SIGUSR1",))
    run, seen = tmp_path / "run", []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))  # main's outcome without killing pytest
    try:
        with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 5"):
            fit_in_process(run, None, max_steps=5, save_every=0, keep_last=1, tasks=[SignalDuringEval(True)],
                           signals=("SIGUSR1",))
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert steps(run) == [5] and not (run / "model").exists() and seen == []
    said = fit_in_process(run, "auto", max_steps=5, save_every=0, keep_last=1, tasks=[SignalDuringEval(False)],
                          signals=("SIGUSR1",))
    assert f"resumed from {run / 'checkpoints' / 'step-00000005'} at step 5" in said
    assert "eval after training" in said and max(losses(run)) == 5
    assert_same_weights(run, reference)


# The bound (14): a resume on another world size ends within 1e-6 (relative) of the uninterrupted
# run. In float32 it cannot: the gradient all-reduce sums the ranks' parts in another order than one
# process does, and Adam divides the resulting rounding noise by sqrt(v) ~ |g| on entries whose gradient
# is ~0, turning it into full-size steps (measured 1.1e-4 in float32). model.dtype=float64 moves that
# noise ~9 orders of magnitude down; the saved model/ is float32 (the float64 runs agree so closely that
# their float32 roundings differ, if at all, by one unit on near-0 entries).
F64 = "model.dtype=float64"
EXACT = 1e-6


def loss_rel_diff(run: Path, reference: Path) -> float:
    ours, ref = losses(run), losses(reference)
    assert ours and set(ours) <= set(ref), (sorted(ours), sorted(ref))
    return max(abs(v - ref[s]) / abs(ref[s]) for s, v in ours.items())


def test_resume_on_another_world_size_ends_where_the_uninterrupted_run_does(tmp_path):
    """The global batch and the sampler do not depend on the world size, so a checkpoint taken on 2
    ranks resumes on 1 and the reverse (DDP). Dropout off (a copy of the tiny BERT with its dropout
    probabilities at 0): each rank's dropout stream cannot be carried over to another layout, and
    without dropout the step's gradient is the global batch's on any number of ranks."""
    from helpers import max_rel_diff

    common = [f"model.path={tiny_bert_without_dropout(tmp_path)}", "dist=ddp", "trainer.keep_last=3",  # 4, 8, 12
              "trainer.log_every=1", F64]

    def single(*args: str) -> subprocess.CompletedProcess:
        return one_process(*common, *args)

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
        assert sorted(losses(run)) == list(range(5, 13)), sorted(losses(run))
        for reference in (one, two):
            # Per tensor, relative to its largest entry with a floor (helpers.max_rel_diff): a tensor that
            # training leaves at ~0 (attention key biases) holds only rounding noise. Measured in float64
            # (2026-12-01): weights at most 2.4e-13, losses at most 7.1e-16 (float32: 1.1e-4 weights).
            worst, loss = max_rel_diff(weights(run), weights(reference)), loss_rel_diff(run, reference)
            assert worst < EXACT and loss < EXACT, (source.name, reference.name, worst, loss)


def tiny_bert_without_dropout(tmp_path: Path) -> Path:
    from train import assets

    model = tmp_path / "tiny-bert"
    shutil.copytree(assets.path("tiny-bert"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *TWO, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_fsdp2_checkpoints_are_resharded_from_two_ranks_onto_one_and_back(tmp_path):
    """torch.distributed.checkpoint reshards FSDP2's per-rank parameter and Adam shards on load: the
    2-rank run's step-4 checkpoint resumes on 1 process, that run's step-8 checkpoint (written by 1)
    resumes on 2 ranks, and both end where the uninterrupted 2-rank run does."""
    from helpers import max_rel_diff

    common = [f"model.path={tiny_bert_without_dropout(tmp_path)}", "dist=fsdp2", "trainer.keep_last=3",  # 4, 8, 12
              "trainer.log_every=1", F64]
    two, one, back = tmp_path / "two", tmp_path / "from-two", tmp_path / "from-one"
    ref = finish(torchrun(*common, f"hydra.run.dir={two}"))
    assert ref.returncode == 0 and "world size 2 (rank 1" in ref.stderr, ref.stderr[-3000:]
    shutil.copytree(two / "checkpoints" / "step-00000004", one / "checkpoints" / "step-00000004")
    out = one_process(*common, f"hydra.run.dir={one}", "trainer.resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 1" in out.stderr and "(written on 2 ranks, resumed on 1)" in out.stderr
    shutil.copytree(one / "checkpoints" / "step-00000008", back / "checkpoints" / "step-00000008")
    out = finish(torchrun(*common, f"hydra.run.dir={back}", "trainer.resume=auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(written on 1 ranks, resumed on 2)" in out.stderr
    # The DDP test's bound and reason; measured in float64 (2026-12-01): 2 -> 1 weights 6.6e-14, losses
    # 3.5e-16; 1 -> 2 weights 5.4e-14, losses 1.7e-16.
    for run, steps in ((one, range(5, 13)), (back, range(9, 13))):
        assert sorted(losses(run)) == list(steps), (run.name, sorted(losses(run)))
        worst, loss = max_rel_diff(weights(run), weights(two)), loss_rel_diff(run, two)
        assert worst < EXACT and loss < EXACT, (run.name, worst, loss)


# --- a signal inside a long step: given up at the next chunk boundary ----------------------------------


class SignalAtForward:
    """Sends SIGUSR1 to this process from inside the `at`-th forward pass (counting from 0): a signal
    that arrives mid-step, at a chosen chunk, with no timing involved."""

    def __init__(self, at: int):
        self.at, self.calls, self.engine = at, 0, None

    def __call__(self, engine) -> None:
        self.engine, forward = engine, engine.forward

        def signalling(ids, mask):
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
            self.calls += 1
            return forward(ids, mask)

        engine.forward = signalling


@pytest.mark.parametrize("where", ["no-grad pass", "replay"])
def test_a_signal_mid_step_gives_the_step_up_and_the_resume_replays_it_exactly(where, tmp_path):
    """Batch 8 in 2 chunks (4 forwards a step: 2 without gradient, 2 replayed), dropout on. SIGUSR1 in the
    3rd step's 2nd no-grad forward, or in its 1st replayed forward (one chunk's gradient already in
    .grad): the step is given up at the next chunk boundary, step 2 is checkpointed with the RNG and
    data position of before step 3, and the resumed run ends bit-identical to one never stopped. On
    main the step ran to its end and step 3 was checkpointed."""
    from train.preempt import Preempted

    reference = tmp_path / "reference"
    fit_in_process(reference, None, max_steps=5, save_every=0, keep_last=1, signals=("SIGUSR1",))
    run = tmp_path / "run"
    hook = SignalAtForward(2 * 4 + (1 if where == "no-grad pass" else 2))
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 2"):
        fit_in_process(run, None, max_steps=5, save_every=0, keep_last=1, signals=("SIGUSR1",), on_engine=hook)
    assert hook.calls == 2 * 4 + (2 if where == "no-grad pass" else 3)  # no forward after the boundary
    assert all(p.grad is None for p in hook.engine.module.parameters())  # the replayed chunk's share dropped
    assert steps(run) == [2] and max(losses(run)) == 2
    said = fit_in_process(run, "auto", max_steps=5, save_every=0, keep_last=1, signals=("SIGUSR1",))
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in said
    assert losses(run) == losses(reference)
    assert_same_weights(run, reference)


def test_a_signal_in_the_first_step_leaves_no_checkpoint_and_a_fresh_start_is_exact(tmp_path):
    """Given up in step 1: nothing finished, nothing written; the requeued run (resume=auto finds no
    checkpoint) starts afresh."""
    from train.preempt import Preempted

    run, hook = tmp_path / "run", SignalAtForward(1)
    with pytest.raises(Preempted, match="after step 0; checkpoint none"):
        fit_in_process(run, None, max_steps=3, save_every=0, keep_last=1, signals=("SIGUSR1",), on_engine=hook)
    assert steps(run) == [] and not (run / "model").exists()
