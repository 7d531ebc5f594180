"""What the preemption flag costs a step: contrastive steps with the per-chunk stop check and without.

    python tools/stop_flag_cost.py [--batch 256] [--chunk 4] [--reps 6]                     # 1 process
    torchrun --standalone --nproc_per_node 2 tools/stop_flag_cost.py [same options]      # 2 gloo ranks

The quickstart's model (all-MiniLM-L6-v2, max_length 32) under DDP on SNLI triples, --batch examples a
step in chunks of --chunk examples, so a step asks the flag at every chunk boundary (about 2 x chunks
a rank). Steps with the check (`stop` as trainer.fit builds it: the caught signal number, max-reduced
over the ranks on the CPU group) and without alternate (ABAB..., after one warm-up of each), so that a
drift in the machine's load falls on both. Gradients are zeroed, not stepped: the same batch every
step. Also times the flag's all-reduce alone (--calls of them). Rank 0 prints one JSON line:

    stop_calls_per_step   how many times a step asked
    step_s_without, step_s_with   median seconds a step
    overhead_s, overhead_pct      median with - median without (a step), and as a share of without
    flag_us               microseconds per flag all-reduce alone (median of 5 rounds of --calls)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from train import assets, dist, engines
from train.data import collate, read_source, shard
from train.gradcache import contrastive_step
from train.losses import contrastive_loss
from train.model import freeze_unused, load_encoder
from train.optim import param_groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--reps", type=int, default=6, help="steps of each kind, after one warm-up of each")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()

    world = dist.init_world("cpu")
    torch.manual_seed(0)
    encoder = load_encoder(str(assets.path("minilm")), pooling="mean", max_length=32).train()
    freeze_unused(encoder)
    engine = engines.wrap(encoder, world, "ddp", make_optimizer=lambda m: torch.optim.SGD(param_groups(m, 0.0), lr=0.0),
                          make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                          max_grad_norm=None, bf16=False, per_rank_batch=args.batch // world.size)
    source = read_source("snli", str(assets.path("snli") / "train_triples.jsonl"), limit=args.batch)
    batch = collate([source], shard([(0, r) for r in range(args.batch)], world.rank, world.size), encoder.tokenize)
    loss = functools.partial(contrastive_loss, temperature=0.05, symmetric=True)
    where, signum, asked = dist.flag_device(world), 0, [0]

    def stop() -> bool:  # as trainer.fit builds it
        asked[0] += 1
        return bool(dist.any_rank(signum, where))

    def step(check: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        engine.begin_step()
        contrastive_step(engine, batch, loss, args.chunk, stop=stop if check else None)
        engine.module.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    asked[0] = 0
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.reps):
        for check in (False, True):
            times[check].append(step(check))
    calls_per_step = asked[0] / args.reps

    flag_us = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            dist.any_rank(0, where)
        flag_us.append((time.perf_counter() - t0) / args.calls * 1e6)

    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    if world.is_main:
        print(json.dumps({"world_size": world.size, "batch": args.batch, "chunk": args.chunk,
                          "chunks_per_rank": -(-args.batch // world.size // args.chunk),
                          "stop_calls_per_step": calls_per_step, "reps": args.reps,
                          "step_s_without": round(without, 3), "step_s_with": round(with_, 3),
                          "overhead_s": round(with_ - without, 4),
                          "overhead_pct": round(100 * (with_ - without) / without, 2),
                          "steps_without": [round(t, 3) for t in times[False]],
                          "steps_with": [round(t, 3) for t in times[True]],
                          "flag_us": round(statistics.median(flag_us), 1)}))
    dist.shutdown()


if __name__ == "__main__":
    main()
