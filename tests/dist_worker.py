"""Launched by torchrun from tests: contrastive steps under a strategy on 2 ranks.

For each case it writes, from rank 0, the whole reduced gradient, the global loss and the
result of a label-alignment check, for the test to compare with a single-process
full-batch reference. Every case asserts the world size it was launched with.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        OUT_DIR CASE...      CASE = NAME:STRATEGY:ZERO_STAGE:BATCH:CHUNK:ACCUM

A NAME starting with `abandoned` first gives a step up mid-replay (a preemption signal) and discards it;
one containing `gathered` keeps FSDP2's parameters gathered through the step
(dist.fsdp_keep_gathered). Every case also counts the step's parameter all-gathers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from helpers import snli_source, snli_source_with_cross_rank_duplicates, tiny_encoder  # noqa: E402

from train import dist, engines  # noqa: E402
from train.data import collate, shard  # noqa: E402
from train.gradcache import contrastive_step, make_pairing  # noqa: E402
from train.losses import contrastive_loss  # noqa: E402
from train.model import freeze_unused, load_encoder  # noqa: E402
from train.optim import param_groups  # noqa: E402

LOSS = functools.partial(contrastive_loss, temperature=0.05, symmetric=True)
ONE_WAY = functools.partial(contrastive_loss, temperature=0.05, symmetric=False)  # queries stay local
EXPECTED_WORLD = 2


def labels_aligned(batch, world) -> bool:
    """Every local query's label column holds exactly that query's own positive passage."""
    torch.manual_seed(0)
    q = torch.randn(len(batch), 8)
    p = torch.randn(len(batch) * batch.group, 8)
    pair = make_pairing(q, p, batch, mask_duplicates=True, world=world)
    own_positives = p[:: batch.group]
    return bool(torch.equal(pair.p_all[pair.labels], own_positives)) and pair.row0 == world.rank * len(batch)


def give_up_a_step(engine, batch, chunk: int, at: int) -> None:
    """A step given up as on a preemption signal: stop() says yes at its `at`-th boundary (the same on
    every rank, as the agreed flag is), after some chunks' gradients were accumulated; then discarded."""
    from train.gradcache import Abandoned

    asked = [0]

    def stop() -> bool:
        asked[0] += 1
        return asked[0] == at

    engine.begin_step()
    try:
        contrastive_step(engine, batch, LOSS, chunk, stop=stop)
    except Abandoned:
        engine.discard_grads()
        return
    raise AssertionError(f"the step was not given up at boundary {at} (asked {asked[0]} times)")


@contextlib.contextmanager
def counting_all_gathers():
    """Counts torch.distributed.all_gather_single calls: FSDP2 gathers each group's parameters with one."""
    count, original = [0], torch.distributed.all_gather_single

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    torch.distributed.all_gather_single = counted
    try:
        yield count
    finally:
        torch.distributed.all_gather_single = original


def run_case(strategy: str, zero: int, world, batch_size: int, chunk: int, accum: int, coalesce: bool = True,
             lora: bool = False, one_way: bool = False, abandon: bool = False, keep_gathered: bool = False):
    from train import assets

    torch.manual_seed(0)
    if lora:  # the tiny Llama with a LoRA adapter: only the adapter's matrices are trainable
        from helpers import tiny_lora_encoder

        encoder = tiny_lora_encoder().eval()
    else:
        encoder = load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32).eval()
    freeze_unused(encoder)  # as the composition root does: DDP needs every trainable parameter used
    per_rank = batch_size // world.size
    engine = engines.wrap(encoder, world, strategy,
                       make_optimizer=lambda m: torch.optim.SGD(param_groups(m, 0.0), lr=0.1),
                       make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                       max_grad_norm=None, bf16=False, per_rank_batch=per_rank * accum, zero_stage=zero,
                       coalesce_reduction=coalesce, fsdp_keep_gathered=keep_gathered)
    engine.module.eval()
    source = snli_source_with_cross_rank_duplicates(batch_size * accum, batch_size)
    if abandon:  # first a step given up with part of its gradient accumulated: none of it may remain
        rows = [(0, r) for r in range(batch_size)]
        batch = collate([source], shard(rows, world.rank, world.size), encoder.tokenize)
        chunks = -(-batch_size // world.size // chunk)
        give_up_a_step(engine, batch, chunk, at=chunks + 1 + 2)  # the no-grad pass, the loss, 2 replayed chunks
    engine.begin_step()
    abandons = engine.abandons_steps  # asked as _train_step asks it: after begin_step()
    losses, aligned = [], True
    with counting_all_gathers() as all_gathers:
        for micro in range(accum):
            rows = [(0, r) for r in range(micro * batch_size, (micro + 1) * batch_size)]
            batch = collate([source], shard(rows, world.rank, world.size), encoder.tokenize)
            aligned &= labels_aligned(batch, world)
            stats = contrastive_step(engine, batch, ONE_WAY if one_way else LOSS, chunk, scale=1.0 / accum,
                                     reduce=micro == accum - 1, gather_queries=not one_way)
            losses.append(dist.mean_over_ranks(stats.loss, world.device))
    grads = engine.full_grads()
    return {"grads": grads, "losses": losses, "aligned": aligned, "world_size": world.size, "abandons": abandons,
            "all_gathers": all_gathers[0], "chunks": stats.chunks}


def embed_shares(world) -> list:
    """embed.embedder's embeddings for 1 text, then 3 (1 of them cached), on every rank."""
    from train.embed import embedder

    encoder = tiny_encoder()
    embed = embedder(encoder, world, batch_size=2)
    return [embed(["a dog runs"], None), embed(["a dog runs", "rain", "two people sit on a bench"], "query")]


def embed_fault(world) -> str:
    """The error every rank raises when rank 1's evaluation forward fails."""
    from train.embed import embedder
    from train.errors import UserError

    encoder = tiny_encoder()

    def forward(ids, mask):
        if world.rank == 1:
            raise RuntimeError("out of memory (planted)")
        return encoder(ids, mask)

    try:
        embedder(encoder, world, batch_size=2, forward=forward)(["a dog runs", "rain", "a bench"], None)
    except UserError as e:
        return str(e)
    return "no error"


def save_fault(world, run_dir: Path) -> str:
    """The error every rank raises from trainer.fit when rank 0's final model save fails (a full disk)."""
    import errno

    from train.build import FitConfig
    from train.data import Mixture
    from train.errors import UserError
    from train.jobs.train import fit
    from train.log import Logger

    torch.manual_seed(0)
    run_dir.mkdir(exist_ok=True)
    encoder = tiny_encoder().train()
    freeze_unused(encoder)
    engine = engines.wrap(encoder, world, "ddp", make_optimizer=lambda m: torch.optim.SGD(param_groups(m, 0.0), lr=0.1),
                         make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                         max_grad_norm=None, bf16=False, per_rank_batch=4)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    engine.encoder.save = full_disk
    cfg = FitConfig(max_steps=1, chunk_size=4, accum_steps=1, group_by_length=True, mask_duplicates=True,
                    log_every=1, eval_before=False, eval_every=0, eval_batch_size=8)
    logger = Logger(run_dir, world.is_main, 1, progress=False)
    try:
        fit(engine, Mixture(sizes=[32], weights=[None], homogeneous=[False], batch_size=8), [snli_source(32)],
            LOSS, [], logger, cfg, run_dir)
    except UserError as e:
        return str(e)
    finally:
        logger.close()
    return "no error"


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    world = dist.init_world("cpu")
    assert world.size == EXPECTED_WORLD == torch.distributed.get_world_size(), world
    for case in cases:
        if case == "crash_rank1":  # rank 1 dies while rank 0 waits in a collective
            if world.rank == 1:
                raise SystemExit("rank 1 fails on purpose")
            dist.gather(torch.zeros(1))
            continue
        if case == "embed_shares":  # fewer new texts than ranks, then some cached and some new
            torch.save(embed_shares(world), out / f"embed_shares-rank{world.rank}.pt")
            continue
        if case == "embed_fault":  # rank 1's forward fails: every rank must raise, naming it
            (out / f"embed_fault-rank{world.rank}.txt").write_text(embed_fault(world))
            continue
        if case == "save_fault":  # rank 0 cannot write the final model: rank 1 must not wait for it
            (out / f"save_fault-rank{world.rank}.txt").write_text(save_fault(world, out / "run"))
            continue
        label, strategy, zero, batch_size, chunk, accum = case.split(":")
        result = run_case(strategy, int(zero), world, int(batch_size), int(chunk), int(accum),
                          coalesce="per_chunk" not in label, lora=label.startswith("lora"),
                          one_way=label.startswith("one_way"), abandon=label.startswith("abandoned"),
                          keep_gathered="gathered" in label)
        if world.is_main:
            torch.save(result, out / f"{label}.pt")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
