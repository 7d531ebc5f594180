"""job=train: the training loop over built objects (build.training); read it top to bottom.

    evaluate the starting model (or restore a checkpoint: weights, optimizer, schedule, data position, RNG)
    for each optimizer step:
        for each accumulated contrastive batch:
            the next global batch's slice of this rank, tokenized ahead (prefetch.py)
            forward + loss + backward (gradient-cached when chunk < batch)   gradcache.py
              (a cross-encoder: its (query, passage) pairs scored, per-query loss)   rerank.py
        clip, step, schedule, zero grad                                      dist.py engine
        log; checkpoint every N steps, or on a preemption signal (then stop); evaluate every N steps
        (a signal mid-step gives the step up at its next chunk boundary: checkpoint the step before, stop)
    checkpoint at max_steps, evaluate again, print before/after side by side, save the model
    (the signal handlers stay installed to the end: a signal there stops the run, the requeued run
    resumes at max_steps and only evaluates and saves)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from train import card, checkpoint, dist, streaming
from train.atomic import write_json, write_text
from train.build import FitConfig, Training
from train.data import Mixture, Source, collate, collate_pairs
from train.embed import embedder
from train.errors import UserError
from train.evaluate import Selection, run_tasks, side_by_side
from train.gradcache import Abandoned, contrastive_step
from train.log import Logger, say
from train.preempt import Preempted, Watch
from train.prefetch import Prefetcher
from train.rerank import rerank_step, scorer


def run(t: Training) -> dict:
    try:
        return fit(t.engine, t.mixture, t.sources, t.loss_fn, t.tasks, t.logger, t.fit, t.run_dir, t.card)
    finally:
        t.logger.close()


def evaluate(engine, tasks: list, batch_size: int, dims: list[int] | None = None,
             cross_encoder: bool = False) -> dict[str, float]:
    engine.module.eval()
    try:
        if cross_encoder:  # rerank tasks: the model scores (query, passage) pairs
            return run_tasks(tasks, scorer(engine, batch_size))
        return run_tasks(tasks, embedder(engine.encoder, engine.world, batch_size, forward=engine.forward), dims)
    finally:
        engine.module.train()


def save_checkpoint(engine, mixture: Mixture, step: int, cfg: FitConfig, run_dir: Path, before,
                    selection: Selection | None = None, streams: list[dict] | None = None) -> Path:
    """Every rank writes its part into a temp folder; rank 0 completes it and renames (checkpoint.py).
    streams: this rank's stream positions (data.streaming), each rank its own."""
    world, root = engine.world, run_dir / "checkpoints"
    tmp = checkpoint.temp_dir(root, step)
    # Each agree ends in an all-reduce, so it is also the barrier: no rank writes into the folder
    # before rank 0 made it, and rank 0 completes it only after every rank wrote its part.
    dist.agree(world, lambda: checkpoint.prepare(root, step, world.is_main), f"checkpoint at step {step}")

    def write() -> None:
        torch.save(checkpoint.rng_state(), tmp / f"rng-rank{world.rank}.pt")
        if streams is not None:
            write_json(tmp / f"streams-rank{world.rank}.json", streams)
        engine.save_state(tmp)  # collective for sharded strategies

    dist.agree(world, write, f"cannot write the checkpoint of step {step} into {tmp}")
    meta = {"step": step, "mixture": mixture.state_dict(), "before": before, "identity": cfg.identity,
            "selection": selection.state_dict() if selection else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    final = checkpoint.step_dir(root, step)
    dist.agree(world, lambda: world.is_main and checkpoint.finish(root, tmp, step, meta, cfg.keep_last),
           f"checkpoint at step {step}")
    return final


def restore(engine, mixture: Mixture, sources: Sequence[Source], cfg: FitConfig, logger: Logger
            ) -> tuple[int, dict | None, dict, dict | None]:
    """(step, starting metrics, this rank's RNG states, selection state) of the newest checkpoint that
    loads on every rank; a broken one is reported and the one before it tried. The caller sets the
    RNG states last."""
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
                if any(s.streaming for s in sources):  # same world size (check_compatible)
                    streaming.seek(sources, json.loads((folder / f"streams-rank{world.rank}.json").read_text()))
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
        return meta["step"], meta["before"], rng, meta.get("selection")
    raise UserError(f"trainer.resume: none of the checkpoints loads ({', '.join(str(f) for f in cfg.resume_from)})")


def abandon_newer(world: dist.World, run_dir: Path, step: int, logger: Logger) -> None:
    """After a resume from `step`: this run dir's later checkpoints are of a line no longer followed
    (checkpoint.py, lineage); set them aside on rank 0, agreed by every rank."""
    moved = dist.agree(world, lambda: world.is_main and checkpoint.abandon_newer(run_dir / "checkpoints", step),
                   f"resume at step {step}")
    for p in moved or []:
        logger.print(f"set aside {p.name}: newer than the resumed step {step}, kept until this run passes it")


def _train_step(engine, data: Prefetcher, loss_fn: Callable, logger: Logger, cfg: FitConfig, step: int,
                stop: Callable[[], bool] | None = None) -> bool:
    """One optimizer step over `accum_steps` contrastive batches, then its log record.

    stop: asked at every chunk boundary (gradcache.Abandoned). When it gives the step up, the gradients
    are discarded and the RNG and the data position are put back as they were before the step, so the
    checkpoint of step - 1 written next resumes into this very step; returns False then."""
    world = engine.world
    t0 = time.perf_counter()
    if stop is not None:
        rng, position = checkpoint.rng_state(), data.position()
    engine.begin_step()
    if not engine.abandons_steps:  # this engine's step cannot be given up midway (engines.py): it runs to its end
        stop = None
    losses, padded, real, texts, largest = [], 0, 0, 0, 0
    try:
        for micro in range(cfg.accum_steps):
            batch = data.next()  # this rank's slice of the next global batch, tokenized
            last = micro == cfg.accum_steps - 1
            if cfg.cross_encoder:
                stats = rerank_step(engine, batch, loss_fn, cfg.chunk_size, cfg.group_by_length,
                                    scale=1.0 / cfg.accum_steps, reduce=last, stop=stop)
            else:
                stats = contrastive_step(engine, batch, loss_fn, cfg.chunk_size, cfg.group_by_length,
                                         cfg.mask_duplicates, scale=1.0 / cfg.accum_steps, reduce=last,
                                         chunk_tokens=cfg.chunk_tokens, gather_queries=cfg.gather_queries,
                                         packed=cfg.packed, row_tokens=cfg.row_tokens, stop=stop)
            losses.append(stats.loss)
            padded, real, texts = padded + stats.padded_tokens, real + stats.real_tokens, texts + stats.texts
            largest = max(largest, stats.largest_chunk)
    except Abandoned:
        engine.discard_grads()
        checkpoint.set_rng_state(rng)
        data.rewind(position)
        logger.print(f"step {step} given up at a chunk boundary after {time.perf_counter() - t0:.1f} s "
                     "(a preemption signal); its parameters were never changed")
        return False
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
        "chunks": stats.chunks, "largest_chunk_tokens": largest, "seconds": seconds,
        "data_wait_s": data.take_waited(),
    }, show)
    return True


def fit(engine, mixture: Mixture, sources: Sequence[Source], loss_fn: Callable, tasks: list, logger: Logger,
        cfg: FitConfig, run_dir: Path, card_info: card.CardInfo | None = None) -> dict:
    world = engine.world

    # --- the starting point: a checkpoint, or the model as loaded -----------------------------------
    start, rng = 0, None
    selection = Selection(cfg.select) if cfg.select else None
    if cfg.resume_from:
        start, before, rng, chosen = restore(engine, mixture, sources, cfg, logger)
        abandon_newer(world, run_dir, start, logger)
        if selection and chosen:  # the step chosen before the preemption, its model already in model/
            selection.load_state_dict(chosen)
    else:
        before = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims, cfg.cross_encoder) \
            if tasks and cfg.eval_before else None
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
    # A signal gives up a long step at its next chunk boundary (a 32k-example step takes minutes, the
    # grace period is about 30 s): the flag is agreed over gloo, so asking never waits for the GPU.
    stop = None
    if watch.signals:
        where = dist.flag_device(world)

        def stop() -> bool:
            return bool(dist.any_rank(watch.signum, where))
    with watch, Prefetcher(mixture, sources, engine.encoder, world.rank, world.size, cfg.num_workers,
                           collate_pairs if cfg.cross_encoder else collate) as data:
        for step in range(start + 1, cfg.max_steps + 1):
            if not _train_step(engine, data, loss_fn, logger, cfg, step, stop):
                # Nothing of this step is kept: checkpoint the one before (unless none finished: then a
                # requeued run simply starts afresh) and stop.
                done = step - 1
                saved = save_checkpoint(engine, mixture, done, cfg, run_dir, before, selection,
                                        data.streams) if done else None
                logger.print(f"checkpoint {saved}" if saved else "no step finished: nothing to checkpoint")
                raise Preempted(done, watch.signum, str(saved or "none"), watch.previous.get(watch.signum))
            # Evaluate before any checkpoint of this step, so the checkpoint holds the selection that
            # includes it: a run preempted here and resumed neither skips nor repeats this evaluation.
            if cfg.eval_every and tasks and step % cfg.eval_every == 0 and step != cfg.max_steps:
                metrics = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims, cfg.cross_encoder)
                logger.write({"step": step, "eval": metrics})
                logger.print(f"eval at step {step}:\n" + side_by_side(before, metrics))
                if selection and _improves(selection, step, metrics, world):
                    save_model(engine, run_dir / "model", card_info, before, metrics, selection)
                    logger.print(f"step {step} is the best so far by {selection.metric} ({selection.value:.4f}): "
                                 f"saved to {run_dir / 'model'}")
            signum = dist.any_rank(watch.signum, world.device)  # any rank's signal stops every rank here
            due = cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps
            if due or (signum and step < cfg.max_steps):
                saved = save_checkpoint(engine, mixture, step, cfg, run_dir, before, selection, data.streams)
                logger.print(f"checkpoint {saved}")
                if signum:
                    raise Preempted(step, watch.signum, str(saved), watch.previous.get(watch.signum))
        train_seconds = time.perf_counter() - t_start
        return _finish(engine, mixture, tasks, logger, cfg, run_dir, before, start, watch, train_seconds, card_info,
                       selection, data.streams)


def _finish(engine, mixture: Mixture, tasks: list, logger: Logger, cfg: FitConfig, run_dir: Path, before,
            start: int, watch: Watch, train_seconds: float, card_info: card.CardInfo | None = None,
            selection: Selection | None = None, streams: list[dict] | None = None) -> dict:
    """The end of the run, still under the preemption handlers: a checkpoint at max_steps first, so a
    signal during the final evaluation, the LoRA merge or the save loses no step and exits to be
    requeued; the requeued run resumes at max_steps, trains nothing and does only this."""
    world = engine.world
    final = checkpoint.step_dir(run_dir / "checkpoints", cfg.max_steps)
    if start < cfg.max_steps:
        saved = save_checkpoint(engine, mixture, cfg.max_steps, cfg, run_dir, before, selection, streams)
        logger.print(f"checkpoint {saved}")

    def stop_if_signalled() -> None:  # every rank calls it: any rank's signal stops all of them
        if dist.any_rank(watch.signum, world.device):
            raise Preempted(cfg.max_steps, watch.signum, str(final), watch.previous.get(watch.signum))

    # --- final evaluation and save ----------------------------------------------------------------
    stop_if_signalled()
    after = evaluate(engine, tasks, cfg.eval_batch_size, cfg.eval_dims, cfg.cross_encoder) if tasks else {}
    if after:
        logger.write({"step": cfg.max_steps, "eval": after})
        logger.print("eval after training:\n" + side_by_side(before, after))
    stop_if_signalled()  # a signal during the save itself is held until the model is complete
    out = run_dir / "model"
    # The selection's state at max_steps is not checkpointed: a run stopped from here on resumes at
    # max_steps with the state before this evaluation, and makes the same choice again.
    last_is_best = selection is None or _improves(selection, cfg.max_steps, after, world)
    if last_is_best:
        save_model(engine, out, card_info, before, after, selection)
    elif card_info:  # model/ holds the chosen step; its card now has the final figures too
        dist.agree(world, lambda: world.is_main and write_text(
            out / "README.md", card.render(card_info, before, after, _best(selection))), f"cannot write {out}")
    if selection and cfg.keep_last_model:
        save_model(engine, run_dir / "model-last", card_info, before, after, None)

    def summarise() -> None:
        if world.is_main:
            summary = {"before": before, "after": after, "train_seconds": train_seconds, "steps": cfg.max_steps,
                       "world_size": world.size, "model": str(out),
                       "selected": selection.state_dict() if selection else None}
            write_json(run_dir / "eval.json", summary)
            chosen = f", the step {selection.step} chosen by {selection.metric}" if selection else ""
            logger.print(f"model saved to {out}{chosen}  (train {train_seconds / 60:.1f} min)")

    dist.agree(world, summarise, f"cannot write {run_dir / 'eval.json'}")
    return {"before": before, "after": after, "model": str(out),
            "selected": selection.state_dict() if selection else None}


def _improves(selection: Selection, step: int, metrics: dict, world: dist.World) -> bool:
    """Whether `step` is the new best. Rank 0 decides and tells the others: every rank has the same
    figures, but one decision keeps the collective of the save that follows in step on all ranks."""
    better = bool(dist.broadcast_object(selection.update(step, metrics) if world.is_main else None))
    if better and not world.is_main:
        selection.update(step, metrics)
    return better


def _best(selection: Selection | None) -> dict | None:
    return {"step": selection.step, "metric": selection.metric, "metrics": selection.metrics} if selection else None


def save_model(engine, out: Path, card_info: card.CardInfo | None, before: dict | None, after: dict,
               selection: Selection | None) -> None:
    """The model as it is now into `out` (atomically, with its card). Every rank calls it: gathering a
    sharded model's weights is a collective; agreed, so the other ranks learn of a failed save here,
    not by waiting out the final barrier."""
    state = engine.full_state_dict()
    world = engine.world

    def write() -> None:
        if world.is_main:
            texts = {"README.md": card.render(card_info, before, after, _best(selection))} if card_info else None
            engine.encoder.save(out, state_dict=state or None, texts=texts)

    dist.agree(world, write, f"cannot save the model to {out}")
