"""The training loop: read it top to bottom.

    evaluate the starting model (or restore a checkpoint: weights, optimizer, schedule, data position, RNG)
    for each optimizer step:
        for each accumulated contrastive batch:
            the next global batch's slice of this rank, tokenized ahead (prefetch.py)
            forward + loss + backward (gradient-cached when chunk < batch)   gradcache.py
        clip, step, schedule, zero grad                                      dist.py engine
        log; checkpoint every N steps, or on a preemption signal (then stop); evaluate every N steps
    evaluate again, print before/after side by side, save the model
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from train import checkpoint, dist
from train.data import Mixture, Source
from train.errors import UserError
from train.evaluate import run_tasks, side_by_side
from train.gradcache import contrastive_step
from train.log import Logger, say
from train.model import Encoder, pad
from train.preempt import Preempted, Watch
from train.prefetch import Prefetcher


def make_embed(forward: Callable, encoder: Encoder, world: dist.World, batch_size: int):
    """An `embed(texts, side) -> [N, D]` for one round of evaluation, its work shared by all ranks.

    Texts are sorted by length and dealt round-robin, so every rank gets similar lengths
    and the same number of batches (sharded models need every rank in every forward).
    Embeddings are kept for the round: tasks built from one test set share most texts
    (SNLI's STS pairs and retrieval corpus are the same sentences), and each is embedded once.
    """
    cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def embed_new(texts: list[str], side: str | None, instruction: str | None) -> torch.Tensor:
        ids = encoder.tokenize(texts, side, instruction=instruction) if instruction else encoder.tokenize(texts, side)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        per = math.ceil(len(ids) / world.size)
        mine = order[world.rank :: world.size]
        mine += mine[-1:] * (per - len(mine))  # equal shares: repeat the last text
        local = [forward(*(t.to(world.device) for t in pad([ids[i] for i in mine[s : s + batch_size]],
                                                           encoder.pad_id, encoder.left_pad)))
                 for s in range(0, per, batch_size)]
        gathered = dist.gather(torch.cat(local).float().to(world.device)).cpu()  # [W*per, D]
        out = torch.empty((len(ids), gathered.shape[1]))
        for r in range(world.size):
            idx = order[r :: world.size]
            out[idx] = gathered[r * per : r * per + len(idx)]
        return out

    def embed(texts: Sequence[str], side: str | None, instruction: str | None = None) -> torch.Tensor:
        prompt = encoder.prefix(side, instruction)
        new = list(dict.fromkeys(t for t in texts if (prompt, t) not in cache))
        if new:
            for t, e in zip(new, embed_new(new, side, instruction)):
                cache[(prompt, t)] = e
        return torch.stack([cache[(prompt, t)] for t in texts]) if texts else torch.empty((0, encoder.dim))

    return embed


def evaluate(engine, tasks: list, batch_size: int, dims: list[int] | None = None) -> dict[str, float]:
    engine.module.eval()
    try:
        return run_tasks(tasks, make_embed(engine.forward, engine.encoder, engine.world, batch_size), dims)
    finally:
        engine.module.train()


@dataclass
class FitConfig:
    """What the loop needs from the trainer/eval/data configs, as plain values."""

    max_steps: int
    chunk_size: int
    accum_steps: int
    group_by_length: bool
    mask_duplicates: bool
    log_every: int
    eval_before: bool
    eval_every: int
    eval_batch_size: int
    eval_dims: list[int] | None = None  # Matryoshka prefixes also evaluated
    save_every: int = 0  # checkpoint every N steps; 0: only on a preemption signal
    keep_last: int = 2
    resume_from: list[Path] = field(default_factory=list)  # checkpoints to try, newest first
    identity: dict = field(default_factory=dict)  # settings a checkpoint must share (checkpoint.IDENTITY_KEYS)
    preempt_signals: list[str] = field(default_factory=list)
    num_workers: int = 0  # threads preparing batches ahead of the step (0: in line)


def _agree(world: dist.World, fn: Callable, what: str):
    """Run `fn` on every rank; if it failed on any, raise the same UserError on all of them (a rank
    raising alone would leave the others waiting in the next collective)."""
    error = ""
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported below, on every rank
        result, error = None, f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
    if dist.any_rank(int(bool(error)), world.device):
        errors = dist.all_gather_object(error)
        raise UserError(f"{what}: " + "; ".join(f"rank {r}: {m}" for r, m in enumerate(errors) if m))
    return result


def save_checkpoint(engine, mixture: Mixture, step: int, cfg: FitConfig, run_dir: Path, before) -> Path:
    """Every rank writes its part into a temp folder; rank 0 completes it and renames (checkpoint.py)."""
    world, root = engine.world, run_dir / "checkpoints"
    tmp = checkpoint.temp_dir(root, step)
    # Each _agree ends in an all-reduce, so it is also the barrier: no rank writes into the folder
    # before rank 0 made it, and rank 0 completes it only after every rank wrote its part.
    _agree(world, lambda: checkpoint.prepare(root, step, world.is_main), f"checkpoint at step {step}")

    def write() -> None:
        torch.save(checkpoint.rng_state(), tmp / f"rng-rank{world.rank}.pt")
        engine.save_state(tmp)  # collective for sharded strategies

    _agree(world, write, f"cannot write the checkpoint of step {step} into {tmp}")
    meta = {"step": step, "mixture": mixture.state_dict(), "before": before, "identity": cfg.identity,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    final = checkpoint.step_dir(root, step)
    _agree(world, lambda: world.is_main and checkpoint.finish(root, tmp, step, meta, cfg.keep_last),
           f"checkpoint at step {step}")
    return final


def restore(engine, mixture: Mixture, cfg: FitConfig, logger: Logger) -> tuple[int, dict | None, dict]:
    """(step, starting metrics, this rank's RNG states) of the newest checkpoint that loads on every
    rank; a broken one is reported and the one before it tried. The caller sets the RNG states last."""
    world = engine.world
    for folder in cfg.resume_from:
        meta = None
        try:
            meta = checkpoint.verify(folder) if world.is_main else None
            problem = ""
        except ValueError as e:
            problem = str(e)
        meta, problem = dist.broadcast_object((meta, problem))
        if not problem:
            checkpoint.check_compatible(folder, meta["identity"], cfg.identity)
            try:
                engine.load_state(folder)
                rng = None  # on another world size each rank's dropout stream starts afresh from the seed
                if meta["identity"].get("world_size") == world.size:
                    rng = torch.load(folder / f"rng-rank{world.rank}.pt", weights_only=False)  # our own file
            except Exception as e:  # noqa: BLE001 - any failure to load means: try the previous one
                problem = f"{type(e).__name__}: {e}"
            if dist.any_rank(int(bool(problem)), world.device):
                problem = problem or "it failed to load on another rank"
        if problem:
            if world.is_main:
                say(f"warning: checkpoint {folder} is incomplete or corrupt ({problem}); trying the one before it")
            continue
        mixture.load_state_dict(meta["mixture"])
        logger.rewind(meta["step"])
        moved = f" (written on {meta['identity'].get('world_size')} ranks, resumed on {world.size})"
        logger.print(f"resumed from {folder} at step {meta['step']}" + (moved if rng is None else ""))
        return meta["step"], meta["before"], rng
    raise UserError(f"trainer.resume: none of the checkpoints loads ({', '.join(str(f) for f in cfg.resume_from)})")


def _train_step(engine, data: Prefetcher, loss_fn: Callable, logger: Logger, cfg: FitConfig, step: int) -> None:
    """One optimizer step over `accum_steps` contrastive batches, then its log record."""
    world = engine.world
    t0 = time.perf_counter()
    engine.begin_step()
    losses, padded, real, texts = [], 0, 0, 0
    for micro in range(cfg.accum_steps):
        batch = data.next()  # this rank's slice of the next global batch, tokenized
        stats = contrastive_step(engine, batch, loss_fn, cfg.chunk_size, cfg.group_by_length,
                                 cfg.mask_duplicates, scale=1.0 / cfg.accum_steps,
                                 reduce=micro == cfg.accum_steps - 1)
        losses.append(stats.loss)
        padded, real, texts = padded + stats.padded_tokens, real + stats.real_tokens, texts + stats.texts
    lr = engine.lr  # the rate this step uses
    grad_norm = engine.step()

    # --- log ------------------------------------------------------------------------------------
    show = step % cfg.log_every == 0 or step == cfg.max_steps
    loss = dist.mean_over_ranks(sum(losses) / len(losses), world.device)  # every rank calls it
    seconds = time.perf_counter() - t0
    logger.train_step(step, {
        "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
        "examples_per_s": len(batch) * cfg.accum_steps * world.size / seconds,
        "padded_tokens_per_text": padded / texts, "real_tokens_per_text": real / texts,
        "chunks": stats.chunks, "seconds": seconds, "data_wait_s": data.take_waited(),
    }, show)


def fit(engine, mixture: Mixture, sources: Sequence[Source], loss_fn: Callable, tasks: list, logger: Logger,
        cfg: FitConfig, run_dir: Path) -> dict:
    world = engine.world

    # --- the starting point: a checkpoint, or the model as loaded -----------------------------------
    start, rng = 0, None
    if cfg.resume_from:
        start, before, rng = restore(engine, mixture, cfg, logger)
    else:
        before = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims) if tasks and cfg.eval_before else None
        if before:
            logger.write({"step": 0, "eval": before})
            logger.print("eval before training:\n" + side_by_side(None, before))

    # --- train ------------------------------------------------------------------------------------
    engine.module.train()
    logger.start(start)
    if rng is not None:
        checkpoint.set_rng_state(rng)  # last: nothing between here and the first step draws from it
    t_start = time.perf_counter()
    watch = Watch(cfg.preempt_signals)
    with watch, Prefetcher(mixture, sources, engine.encoder, world.rank, world.size, cfg.num_workers) as data:
        for step in range(start + 1, cfg.max_steps + 1):
            _train_step(engine, data, loss_fn, logger, cfg, step)
            signum = dist.any_rank(watch.signum, world.device)  # any rank's signal stops every rank here
            due = cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps
            if due or (signum and step < cfg.max_steps):
                saved = save_checkpoint(engine, mixture, step, cfg, run_dir, before)
                logger.print(f"checkpoint {saved}")
                if signum:
                    raise Preempted(step, watch.signum, str(saved), watch.previous.get(watch.signum))
            if cfg.eval_every and tasks and step % cfg.eval_every == 0 and step != cfg.max_steps:
                metrics = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims)
                logger.write({"step": step, "eval": metrics})
                logger.print(f"eval at step {step}:\n" + side_by_side(before, metrics))
    train_seconds = time.perf_counter() - t_start

    # --- final evaluation and save ----------------------------------------------------------------
    after = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims) if tasks else {}
    if after:
        logger.write({"step": cfg.max_steps, "eval": after})
        logger.print("eval after training:\n" + side_by_side(before, after))
    state = engine.full_state_dict()  # collective for sharded strategies: every rank calls it
    out = run_dir / "model"
    if world.is_main:
        engine.encoder.save(out, state_dict=state or None)
        summary = {"before": before, "after": after, "train_seconds": train_seconds, "steps": cfg.max_steps,
                   "world_size": world.size, "model": str(out)}
        (run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.print(f"model saved to {out}  (train {train_seconds / 60:.1f} min)")
    return {"before": before, "after": after, "model": str(out)}
