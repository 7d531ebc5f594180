"""data.streaming: sources read as streams, split by rank, shuffled in a buffer, resumed by position."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import checkpoint
from train.data import Mixture
from train.errors import UserError
from train.streaming import StreamMixture, positions, seek, stream_source


def planted(tmp_path: Path, n: int = 40, name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}) + "\n"
                            for i in range(n)))
    return path


def queries(records) -> list[str]:
    return [r[0] for r in records]


def source(path: Path, rank: int = 0, world: int = 1, buffer: int = 0, seed: int = 0, **kw):
    return stream_source("s", str(path), rank=rank, world=world, seed=seed, buffer=buffer, **kw)


def test_ranks_read_disjoint_parts_that_cover_the_corpus_once_per_epoch(tmp_path):
    path = planted(tmp_path)
    for buffer in (0, 8):
        parts = [source(path, rank=r, world=2, buffer=buffer, seed=3) for r in range(2)]
        first = [queries(p.take(range(20))) for p in parts]
        assert sorted(first[0] + first[1], key=lambda q: int(q[1:])) == [f"q{i}" for i in range(40)]
        assert [p.epoch for p in parts] == [0, 0]
        again = [queries(p.take(range(20))) for p in parts]  # the end of a part starts the next epoch
        assert [p.epoch for p in parts] == [1, 1]
        assert sorted(again[0] + again[1], key=lambda q: int(q[1:])) == [f"q{i}" for i in range(40)]
        assert (again[0] != first[0]) == bool(buffer)  # each epoch its own shuffle
    shape = source(path)
    assert (shape.num_negatives, shape.has_scores) == (1, False)
    assert shape.take(range(1)) == [("q0", "p0", ["n0"], None)]


def test_the_shuffle_is_a_function_of_the_seed(tmp_path):
    path = planted(tmp_path)
    a, b, c = (queries(source(path, buffer=16, seed=s).take(range(40))) for s in (1, 1, 2))
    assert a == b and a != c and sorted(a) == sorted(c)
    assert a != [f"q{i}" for i in range(40)]


def test_resume_by_position_continues_the_stream(tmp_path):
    path = planted(tmp_path)
    # stream order (no buffer): exactly where the uninterrupted reading goes on
    whole = source(path)
    head, tail = queries(whole.take(range(7))), None
    state = json.loads(json.dumps(positions([whole])))  # through JSON, as a checkpoint keeps it
    tail = queries(whole.take(range(10)))
    resumed = source(path)
    seek([resumed], state)
    assert queries(resumed.take(range(10))) == tail and not set(head) & set(tail)
    # shuffled: what sat in the buffer is skipped, never repeated
    shuffled = source(path, buffer=8, seed=5)
    seen = queries(shuffled.take(range(12)))
    state = positions([shuffled])
    later = source(path, buffer=8, seed=5)
    seek([later], state)
    rest = []
    while later.epoch == 0:
        rest += queries(later.take(range(1)))
    rest.pop()  # the first record of epoch 1
    assert not set(rest) & set(seen) and len(seen) + len(rest) >= 40 - 8


def test_the_mixture_draws_sources_as_the_indexed_one_does_and_needs_weights(tmp_path):
    a, b = source(planted(tmp_path, name="a.jsonl"), weight=3.0), source(planted(tmp_path, name="b.jsonl"), weight=1.0)
    streamed = StreamMixture.of([a, b], batch_size=16, seed=4)
    indexed = Mixture(sizes=[300, 100], weights=[None, None], homogeneous=[False, False], batch_size=16, seed=4)
    for _ in range(5):
        s, i = streamed.next_batch(), indexed.next_batch()
        assert [src for src, _ in s] == [src for src, _ in i]  # p ~ 3:1 either way, from (seed, step)
    a.weight = None
    with pytest.raises(UserError, match=r"data.sources.s.weight"):
        StreamMixture.of([a, b], batch_size=16)


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="the dataset is empty"):
        source(tmp_path / "empty.jsonl")
    (tmp_path / "x.jsonl").write_text(json.dumps({"title": "t"}) + "\n")
    with pytest.raises(UserError, match=r"x.jsonl \(first record\): no anchor text"):
        source(tmp_path / "x.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl: (could not be read|the first record could not be read)"):
        source(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="no such data file"):
        source(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"data.shuffle_buffer=-1"):
        source(planted(tmp_path), buffer=-1)
    saved = {"data.streaming": True, "dist.strategy": "ddp", "world_size": 2}
    with pytest.raises(UserError, match="data.streaming=true, whose streams are split per rank.*resume on 2 ranks"):
        checkpoint.check_compatible(Path("ck"), saved, {**saved, "world_size": 1})


# --- through the trainer ------------------------------------------------------------------------------

RUN = ["model=tiny_bert", "trainer.batch_size=8", "trainer.chunk_size=4", "eval=none", "data.streaming=true",
       "data.shuffle_buffer=0", "data.num_workers=1", "trainer.max_steps=6", "trainer.save_every=3",
       "trainer.log_every=1", "trainer.progress=false"]


def train(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "train", *RUN, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_streamed_run_on_two_ranks_resumes_where_it_stopped(tmp_path):
    """Each rank reads its own part and saves its own position. With a prefetch thread reading two
    batches ahead, the checkpoint must hold the position of the last batch trained, not of the last
    one read: resumed at step 3, steps 4-6 are the uninterrupted ones."""
    data = planted(tmp_path, n=400)
    ref, run = tmp_path / "ref", tmp_path / "run"
    out = train(f"data.path={data}", f"hydra.run.dir={ref}", ranks=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (rank 1" in out.stderr
    assert "source main: streamed (anchor, positive, 1 negatives)" in out.stderr
    step3 = ref / "checkpoints" / "step-00000003"
    parts = [json.loads((step3 / f"streams-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p[0]["read"] == 3 * 4 for p in parts)  # 3 steps x 4 examples per rank, not the read-ahead
    shutil.copytree(ref / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000003")
    out = train(f"data.path={data}", f"hydra.run.dir={run}", "trainer.resume=auto", ranks=2)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = losses(run)
    assert sorted(resumed) == [4, 5, 6] and resumed == {s: v for s, v in losses(ref).items() if s > 3}
    assert np.isfinite(list(resumed.values())).all()
    record = json.loads((ref / "run.json").read_text())
    assert record["data"]["main"]["records"] is None and record["data"]["main"]["size"] == data.stat().st_size


def test_mining_refuses_a_stream(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "recipe=mine_hard_negatives", "model=tiny_bert",
                          "data.streaming=true", f"data.path={planted(tmp_path)}",
                          f"hydra.run.dir={tmp_path / 'mine'}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    said = out.stderr.strip().splitlines()[-1]
    assert said.startswith("error: data.streaming=true: recipe mine_hard_negatives indexes its records"), said


def test_a_step_given_up_mid_way_records_the_stream_position_of_the_step_before(tmp_path):
    """A signal in step 3 (test_resume.SignalAtForward) gives it up: the checkpoint of step 2 holds the
    stream position after step 2's batch, not after step 3's (read with one prefetch thread), and the
    resumed run logs the uninterrupted run's losses."""
    from helpers import LOSS, plain_engine, tiny_encoder
    from test_resume import SignalAtForward

    from train.build import FitConfig
    from train.jobs.train import fit
    from train.log import Logger
    from train.preempt import Preempted

    path = planted(tmp_path, n=200)

    def run(folder: Path, resume: str | None, hook=None) -> dict[int, float]:
        import torch

        torch.manual_seed(0)
        engine = plain_engine(tiny_encoder().train())
        if hook:
            hook(engine)
        src = source(path)
        cfg = FitConfig(max_steps=4, chunk_size=4, accum_steps=1, group_by_length=True, mask_duplicates=True,
                        log_every=1, eval_before=False, eval_every=0, eval_batch_size=8, save_every=0, keep_last=2,
                        resume_from=checkpoint.candidates(resume, folder), preempt_signals=["SIGUSR1"],
                        identity={"world_size": 1}, num_workers=1)
        folder.mkdir(parents=True, exist_ok=True)
        logger = Logger(folder, True, 4, progress=False)
        try:
            fit(engine, StreamMixture.of([src], 8, 0), [src], LOSS, [], logger, cfg, folder)
        finally:
            logger.close()
        return losses(folder)

    reference = run(tmp_path / "reference", None)
    folder = tmp_path / "run"
    with pytest.raises(Preempted, match="after step 2"):
        run(folder, None, SignalAtForward(2 * 4 + 1))  # 8 examples in 2 chunks: 4 forwards a step
    saved = json.loads((folder / "checkpoints" / "step-00000002" / "streams-rank0.json").read_text())
    assert saved[0]["read"] == 2 * 8
    assert run(folder, "auto") == reference
