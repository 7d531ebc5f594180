"""2 gloo ranks under torchrun vs the single-process full-batch gradient: DDP (uncached,
cached, accumulated), FSDP2, DeepSpeed ZeRO 0-3; label alignment with hard negatives.

Each launch runs several cases (imports cost 7-20 s per launch); the worker asserts that
the world size really is 2 and writes rank 0's results for these tests to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import max_rel_diff, reference_grads, snli_batch, snli_source_with_cross_rank_duplicates, tiny_encoder

from train.model import pad

WORKER = Path(__file__).parent / "dist_worker.py"
TOL = 2e-5


def torchrun(out: Path, *cases: str, timeout: int = 900, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), *cases]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def reference(batch_size: int, accum: int = 1, mask_duplicates: bool = True, **kw):
    """Mean over accumulated batches of the single-process full-batch gradient, on the data the
    worker trains on (duplicates planted across the ranks' slices)."""
    encoder = tiny_encoder()
    source = snli_source_with_cross_rank_duplicates(batch_size * accum, batch_size)
    losses, total = [], None
    for micro in range(accum):
        loss, g = reference_grads(encoder, snli_batch(encoder, range(micro * batch_size, (micro + 1) * batch_size),
                                                      source), mask_duplicates=mask_duplicates, **kw)
        losses.append(loss)
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return losses, {k: v / accum for k, v in total.items()}


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_strategies")
    torchrun(out, "ddp_uncached:ddp:0:32:16:1", "ddp_cached:ddp:0:32:4:1", "ddp_accum:ddp:0:32:4:2",
             "fsdp2_cached:fsdp2:0:32:4:1", "fsdp2_uncached:fsdp2:0:32:16:1", "one_way_cached:ddp:0:32:4:1",
             "abandoned_fsdp2:fsdp2:0:32:4:1", "fsdp2_gathered_cached:fsdp2:0:32:4:1",
             "abandoned_fsdp2_gathered:fsdp2:0:32:4:1")
    return out


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    # The first DeepSpeed use on a machine compiles its CPU communication extension (1-2 min).
    torchrun(out, "zero0:deepspeed:0:32:4:1", "zero1:deepspeed:1:32:4:1", "zero2:deepspeed:2:32:4:1",
             "zero3:deepspeed:3:32:4:1", "zero2_accum:deepspeed:2:32:4:2", "zero2_per_chunk:deepspeed:2:32:4:1",
             "zero3_per_chunk:deepspeed:3:32:4:1", "abandoned_zero2:deepspeed:2:32:4:1",
             "abandoned_zero3:deepspeed:3:32:4:1", timeout=1200)
    return out


def check(result_file: Path, accum: int = 1, **kw) -> None:
    result = torch.load(result_file)
    assert result["world_size"] == 2
    assert result["aligned"], "a query's label column did not hold its own positive"
    ref_losses, ref = reference(32, accum, **kw)
    assert result["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert max_rel_diff(result["grads"], ref) < TOL


def test_the_planted_duplicates_cross_the_ranks_and_change_the_loss():
    """The equivalence tests below exercise cross-rank false-negative masking: every planted
    duplicate pairs a row of rank 0's slice with one of rank 1's, and masking them changes the
    reference loss (so a rank that masked only its own slice would not match it)."""
    from train.data import shard

    source, rows = snli_source_with_cross_rank_duplicates(32, 32), [(0, r) for r in range(32)]
    slices = [{source.anchors[r] for _, r in shard(rows, rank, 2)} for rank in range(2)]
    assert slices[0] & slices[1]
    positives = [{source.positives[r] for _, r in shard(rows, rank, 2)} for rank in range(2)]
    negatives = {n for _, r in shard(rows, 1, 2) for n in source.negatives[r]}
    assert positives[0] & positives[1] and positives[0] & negatives
    assert abs(reference(32)[0][0] - reference(32, mask_duplicates=False)[0][0]) > 1e-3


@pytest.mark.parametrize("case, accum", [("ddp_uncached", 1), ("ddp_cached", 1), ("ddp_accum", 2),
                                         ("fsdp2_cached", 1), ("fsdp2_uncached", 1)])
def test_torch_strategies_match_the_full_batch(torch_runs, case, accum):
    check(torch_runs / f"{case}.pt", accum)


def test_fsdp2_kept_gathered_matches_the_full_batch_with_one_all_gather_per_step(torch_runs):
    """dist.fsdp_keep_gathered: the same gradient as the full batch, and each parameter group (tiny-bert's
    2 blocks and the root) gathered once per step instead of once per forward and once per backward."""
    check(torch_runs / "fsdp2_gathered_cached.pt")
    kept, default = torch.load(torch_runs / "fsdp2_gathered_cached.pt"), torch.load(torch_runs / "fsdp2_cached.pt")
    blocks, chunks = 2, default["chunks"]
    assert chunks == kept["chunks"] == 4  # 16 examples per rank, 4 a chunk
    # By default each block is gathered for its no-grad forward, its replayed forward and its backward; the
    # root (embeddings), which FSDP2 keeps gathered after a forward, once in the no-grad pass and again for
    # each replayed chunk after the first backward resharded it.
    assert default["all_gathers"] == blocks * 3 * chunks + chunks == 28
    assert kept["all_gathers"] == blocks + 1


def test_keeping_parameters_gathered_is_refused_outside_fsdp2(compose):
    from train.build import check_strategy
    from train.errors import UserError

    for strategy in ("dist=ddp", "dist=deepspeed_zero3"):
        cfg = compose([strategy, "dist.fsdp_keep_gathered=true"])
        with pytest.raises(UserError, match="dist.fsdp_keep_gathered=true with dist.strategy=(ddp|deepspeed).*fsdp2"):
            check_strategy(cfg)
    check_strategy(compose(["dist=fsdp2", "dist.fsdp_keep_gathered=true"]))


def test_a_one_way_loss_without_the_query_gather_matches_the_full_batch(torch_runs):
    """loss.symmetric=false reads only the local queries: the 2-rank step that skips their gather
    still equals the single-process full-batch gradient of the same one-way loss."""
    from dist_worker import ONE_WAY

    check(torch_runs / "one_way_cached.pt", loss_fn=ONE_WAY)


@pytest.mark.parametrize("case, accum", [("zero0", 1), ("zero1", 1), ("zero2", 1), ("zero3", 1),
                                         ("zero2_accum", 2), ("zero2_per_chunk", 1), ("zero3_per_chunk", 1)])
def test_deepspeed_matches_the_full_batch(deepspeed_runs, case, accum):
    check(deepspeed_runs / f"{case}.pt", accum)


@pytest.mark.parametrize("case", ["abandoned_fsdp2", "abandoned_fsdp2_gathered", "abandoned_zero2",
                                  "abandoned_zero3"])
def test_a_step_given_up_mid_replay_leaves_no_gradient_behind(torch_runs, deepspeed_runs, case):
    """A step given up after 2 of its 4 chunks were replayed (a preemption signal; the engine's
    discard_grads()), then a whole step: its gradient is the full batch's alone. FSDP2 keeps the partial
    gradient unsharded in its own parameter state and ZeRO in its coalescing block, where zero_grad()
    alone does not reach."""
    runs = torch_runs if "fsdp2" in case else deepspeed_runs
    assert torch.load(runs / f"{case}.pt")["abandons"]
    check(runs / f"{case}.pt")


def test_only_zero_1_and_2_with_per_chunk_reduction_finish_a_step_on_a_signal(deepspeed_runs):
    """Per-chunk reduction adds each chunk's reduced gradient into ZeRO-1/2's partition buffers, which
    only the optimizer step empties (a step given up there left it in the next one: measured with
    tests/dist_worker.py's abandoned_zero2_per_chunk, 1.4 relative off); there the step runs to its end."""
    abandons = {c: torch.load(deepspeed_runs / f"{c}.pt")["abandons"]
                for c in ("zero0", "zero1", "zero2", "zero3", "zero2_per_chunk", "zero3_per_chunk")}
    assert abandons == {"zero0": True, "zero1": True, "zero2": True, "zero3": True, "zero2_per_chunk": False,
                        "zero3_per_chunk": True}


def test_a_crashed_rank_does_not_leave_the_other_hanging(tmp_path):
    """Rank 1 exits while rank 0 waits in a collective: the launch ends well inside the
    timeout, non-zero, with the failed rank named."""
    proc = torchrun(tmp_path, "crash_rank1", timeout=120, ok=False)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert "rank: 1" in proc.stderr or "local_rank: 1" in proc.stderr


def test_fewer_texts_than_ranks_and_faults_of_one_rank(tmp_path):
    """The embedder on 2 ranks with 1 new text (on main: rank 1 got none, raised in pad([]) and left
    rank 0 in the gather), then 3 with 1 cached: every rank returns the 1-process embeddings. And a
    rank whose forward fails is agreed on before the gather."""
    torchrun(tmp_path, "embed_shares", "embed_fault", "save_fault", timeout=300)
    encoder = tiny_encoder()
    texts = ["a dog runs", "rain", "two people sit on a bench"]
    with torch.no_grad():
        want = [encoder(*pad(encoder.tokenize(texts[:1]), encoder.pad_id)),
                torch.cat([encoder(*pad(encoder.tokenize([t], "query"), encoder.pad_id)) for t in texts])]
    for rank in range(2):
        got = torch.load(tmp_path / f"embed_shares-rank{rank}.pt")
        assert [g.shape for g in got] == [(1, 32), (3, 32)]
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want)), rank
    # rank 1's forward failing: both ranks raise the same error naming it, instead of rank 0 waiting
    for rank in range(2):
        said = (tmp_path / f"embed_fault-rank{rank}.txt").read_text()
        assert said == "embedding 3 texts: rank 1: RuntimeError: out of memory (planted)"
    # rank 0's final model save failing (a full disk): rank 1 hears of it instead of waiting at the end
    for rank in range(2):
        said = (tmp_path / f"save_fault-rank{rank}.txt").read_text()
        assert said == (f"cannot save the model to {tmp_path / 'run' / 'model'}: rank 0: OSError: "
                        "[Errno 28] No space left on device")


def test_deepspeed_config_that_contradicts_the_trainer_is_refused(tmp_path):
    from train.engines import deepspeed_config
    from train.errors import UserError

    user = tmp_path / "ds.json"
    user.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"overlap_comm": true}}')
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8 contradicts .* need "
                                       "train_micro_batch_size_per_gpu=16"):
        deepspeed_config(2, per_rank_batch=16, world_size=2, max_grad_norm=1.0, bf16=False, user_file=str(user))
    user.write_text('{"train_batch_size": "auto", "zero_optimization": {"overlap_comm": true}}')
    merged = deepspeed_config(2, per_rank_batch=16, world_size=2, max_grad_norm=1.0, bf16=False,
                              user_file=str(user))
    assert merged["train_batch_size"] == 32 and merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
