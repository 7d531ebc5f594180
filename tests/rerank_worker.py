"""Launched by torchrun from tests/test_rerank.py: cross-encoder steps (rerank.rerank_step) on 2 ranks.

For each strategy it writes, from rank 0, the whole reduced gradient, the global loss per
accumulated batch and the world size, for the test to compare with the single-process full batch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/rerank_worker.py \
        OUT_DIR MODEL_DIR STRATEGY...
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from helpers import grouped_source  # noqa: E402

from train import dist, engines  # noqa: E402
from train.cross_encoder import load_cross_encoder  # noqa: E402
from train.data import collate_pairs, shard  # noqa: E402
from train.losses import rerank_loss  # noqa: E402
from train.optim import param_groups  # noqa: E402
from train.rerank import rerank_step  # noqa: E402

EXPECTED_WORLD = 2
BATCH, CHUNK, ACCUM = 8, 2, 2  # global batch 8 = 2 ranks x 4 examples, forwarded 2 at a time, 2 batches per step


def run_case(strategy: str, model_dir: str, world) -> dict:
    torch.manual_seed(0)
    # dropout off: the ranks' and the reference's masks differ; float64 as the test's reference
    ce = load_cross_encoder(model_dir, dtype=torch.float64).eval()
    engine = engines.wrap(ce, world, strategy, make_optimizer=lambda m: torch.optim.SGD(param_groups(m, 0.0), lr=0.1),
                          make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                          max_grad_norm=None, bf16=False, per_rank_batch=BATCH // world.size * ACCUM)
    engine.module.eval()
    source, loss_fn = grouped_source(BATCH * ACCUM), functools.partial(rerank_loss, kind="listwise")
    engine.begin_step()
    losses = []
    for micro in range(ACCUM):
        rows = [(0, r) for r in range(micro * BATCH, (micro + 1) * BATCH)]
        batch = collate_pairs([source], shard(rows, world.rank, world.size), ce.tokenize)
        stats = rerank_step(engine, batch, loss_fn, CHUNK, scale=1.0 / ACCUM, reduce=micro == ACCUM - 1)
        losses.append(dist.mean_over_ranks(stats.loss, world.device))
    return {"grads": engine.full_grads(), "losses": losses, "world_size": world.size}


def main() -> None:
    out, model_dir, strategies = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    world = dist.init_world("cpu")
    assert world.size == EXPECTED_WORLD == torch.distributed.get_world_size(), world
    for strategy in strategies:
        result = run_case(strategy, model_dir, world)
        if world.is_main:
            torch.save(result, out / f"{strategy}.pt")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
