"""The composition root: the one place that turns config into objects, then runs a job.

    cfg --> checks that need no model (batch vs world, chunk vs batch)
        --> encoder, data sources + mixture, evaluators, loss
        --> engine (strategy wrap + optimizer + schedule) --> trainer.fit
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from train import checkpoint, dist, record
from train.config import recipe_name
from train.data import ALIASES, Mixture, check_shapes, read_source
from train.errors import UserError
from train.evaluate import build_tasks, run_tasks, side_by_side
from train.log import Logger, say
from train.lora import trainable_share
from train.losses import embedding_loss
from train.merge_search import merge_job
from train.mine import mine_job
from train.model import freeze_unused, load_encoder
from train.optim import param_groups, schedule
from train.trainer import FitConfig, fit, make_embed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_bf16(precision: str, world: dist.World) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"trainer.precision={precision!r}: expected auto, bf16 or fp32")
    if precision == "fp32":
        return False
    cuda_bf16 = world.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and world.device.type == "cuda" and not cuda_bf16:
        raise UserError("trainer.precision=bf16, but this CUDA device has no bfloat16 support")
    return cuda_bf16 or precision == "bf16"


def build_encoder(cfg: DictConfig):
    m = cfg.model
    try:
        encoder = load_encoder(
            m.path, pooling=m.pooling, normalize=m.normalize, max_length=m.max_length,
            prompts=OmegaConf.to_container(m.prompts) if m.prompts is not None else None,
            dtype=m.dtype, attn_implementation=m.attn_implementation, truncate_dim=m.truncate_dim,
            bidirectional=m.bidirectional, pool_prompt=m.pool_prompt, instruction_template=m.instruction_template,
            latents=m.latents, latent_heads=m.latent_heads,
            lora_config=OmegaConf.to_container(m.lora) if m.lora is not None else None,
            gradient_checkpointing=m.gradient_checkpointing, quantization=m.quantization)
    except UserError as e:  # name the recipe: a later stage often points at an earlier stage's run
        raise UserError(f"recipe {recipe_name()}: {e}") from e
    for note in encoder.notes:
        say(note)
    return encoder


def build_optimizer(optim: DictConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    """`optim._target_` (a torch optimizer class) over decay / no-decay parameter groups."""
    kwargs = OmegaConf.to_container(optim)
    cls = get_class(kwargs.pop("_target_"))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(param_groups(module, kwargs["weight_decay"]), **kwargs)


def build_sources(cfg: DictConfig) -> tuple[list, list]:
    """(sources, their configs). `data.path` stands for a single source and replaces `data.sources`."""
    d = cfg.data
    if d.path:
        specs = {"main": OmegaConf.structured({"path": d.path, "limit": d.limit})}
    else:
        specs = dict(d.sources)
    if not specs:
        raise UserError("no training data: set data.path=FILE or choose a data config with sources (data=...)")
    sources = []
    if d.num_proc < 1 or d.num_workers < 0 or d.fingerprint not in ("sampled", "full"):
        raise UserError(f"data.num_proc={d.num_proc}, data.num_workers={d.num_workers}, data.fingerprint="
                        f"{d.fingerprint}: expected num_proc >= 1, num_workers >= 0, fingerprint sampled or full")
    for name, s in specs.items():
        sources.append(read_source(name, s.path, fields=dict(s.get("fields") or {}),
                                   num_negatives=s.get("num_negatives"), limit=s.get("limit"),
                                   subset=s.get("subset"), split=s.get("split", "train"),
                                   data_files=s.get("data_files"), cache_dir=d.cache_dir, num_proc=d.num_proc))
        sources[-1].instruction = s.get("instruction")
    check_shapes(sources, [bool(s.get("homogeneous", False)) for s in specs.values()])
    check_fields(cfg, sources)
    return sources, list(specs.values())


def check_fields(cfg: DictConfig, sources: list) -> None:
    """Refuse data that lacks what the recipe trains on: hard negatives where `data.require`
    lists them (supervised SimCSE), teacher scores when distillation is on."""
    need = {role: "data.require" for role in cfg.data.require}
    if cfg.loss.distill_weight:
        need["scores"] = f"loss.distill_weight={cfg.loss.distill_weight}"
    for role, why in need.items():
        if role not in ("negatives", "scores"):
            raise UserError(f"data.require: unknown field {role!r}; expected negatives or scores")
        for s in sources:
            if (s.num_negatives if role == "negatives" else s.scores is not None):
                continue
            raise UserError(f"recipe {recipe_name()} needs {role} ({why}), but source {s.name!r} ({s.origin}) "
                            f"has none: expected a field named one of {', '.join(ALIASES[role])} "
                            f"(or set the source's fields.{role})")


def check_loss(cfg: DictConfig, dim: int) -> None:
    """Matryoshka prefixes (trained and evaluated) must fit the model's dimension."""
    dims, weights = cfg.loss.matryoshka_dims or [], cfg.loss.matryoshka_weights
    for key, values in (("loss.matryoshka_dims", dims), ("eval.dims", cfg.eval.dims or [])):
        for d in values:
            if not 0 < d <= dim:
                raise UserError(f"{key}: {d} is not between 1 and the model's dimension {dim}")
    if weights is not None and len(weights) != len(dims):
        raise UserError(f"loss.matryoshka_weights has {len(weights)} values for "
                        f"{len(dims)} loss.matryoshka_dims; expected one weight per dimension")


def check_strategy(cfg: DictConfig) -> None:
    """LoRA adapters and latent-attention weights are saved from the unsharded module."""
    sharded = cfg.dist.strategy == "fsdp2" or (cfg.dist.strategy == "deepspeed" and cfg.dist.zero_stage == 3)
    if sharded and (cfg.model.lora is not None or cfg.model.pooling == "latent"):
        what = "model.lora" if cfg.model.lora is not None else "model.pooling=latent"
        raise UserError(f"{what} with dist.strategy={cfg.dist.strategy}"
                        f"{' zero_stage=3' if cfg.dist.strategy == 'deepspeed' else ''} is not supported: "
                        "use dist.strategy=ddp (LoRA keeps the trainable state small enough for it)")


def check_batch(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(examples per rank, examples per forward): refuse impossible combinations up front."""
    t = cfg.trainer
    for key in ("max_steps", "batch_size", "accum_steps", "log_every"):
        if t[key] < 1:
            raise UserError(f"trainer.{key}={t[key]}: expected a positive integer")
    if t.batch_size % world_size:
        raise UserError(f"trainer.batch_size={t.batch_size} is not divisible by the world size {world_size}: "
                        "the global batch is split evenly over the ranks")
    per_rank = t.batch_size // world_size
    chunk = t.chunk_size if t.chunk_size is not None else per_rank
    if chunk < 1 or chunk > per_rank:
        raise UserError(f"trainer.chunk_size={chunk} must be between 1 and the per-rank batch {per_rank} "
                        f"(trainer.batch_size={t.batch_size} over {world_size} ranks)")
    return per_rank, chunk


def train_job(cfg: DictConfig, world: dist.World, run_dir: Path) -> dict:
    per_rank, chunk = check_batch(cfg, world.size)
    check_strategy(cfg)
    strategy = cfg.dist.strategy if cfg.dist.strategy != "auto" else ("ddp" if world.size > 1 else "single process")
    say(f"world size {world.size} (rank {world.rank}, device {world.device}), strategy {strategy}, "
        f"global batch {cfg.trainer.batch_size} = {world.size} x {per_rank}, "
        f"chunk {chunk}{' (no caching)' if chunk == per_rank else ' (gradient cache)'}")

    # Data and evaluation sets first: their errors should not wait for a model to load.
    sources, specs = build_sources(cfg)
    for s in sources:
        if world.is_main:
            say(s.describe())
    mixture = Mixture(sizes=[len(s) for s in sources], weights=[s.get("weight") for s in specs],
                      homogeneous=[bool(s.get("homogeneous", False)) for s in specs],
                      batch_size=cfg.trainer.batch_size, seed=cfg.seed, temperature=cfg.data.temperature,
                      names=[s.name for s in sources])
    tasks = build_tasks(cfg.eval.tasks)
    t = cfg.trainer
    for key in ("save_every", "keep_last"):
        if t[key] < 0:
            raise UserError(f"trainer.{key}={t[key]}: expected 0 or a positive integer")
    resume_from = checkpoint.candidates(t.resume, run_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    run_record = None
    if world.is_main:
        fingerprints = record.data_fingerprints(sources, full=cfg.data.fingerprint == "full")
        run_record = record.write(run_dir, fingerprints, world.size, str(resume_from[0]) if resume_from else None)

    encoder = build_encoder(cfg).to(world.device)
    frozen = freeze_unused(encoder)  # on the device: the probe's gradients are cheap there
    trainable, total = trainable_share(encoder)
    if world.is_main and trainable < total:
        say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if frozen and world.is_main:
        say(f"froze {len(frozen)} parameters the embedding never uses ({', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''})")
    check_loss(cfg, encoder.dim)
    loss_fn = functools.partial(embedding_loss, **OmegaConf.to_container(cfg.loss))

    bf16 = use_bf16(t.precision, world)
    engine = dist.wrap(
        encoder, world, cfg.dist.strategy,
        make_optimizer=lambda module: build_optimizer(cfg.optim, module),
        make_scheduler=lambda opt: schedule(opt, t.max_steps, t.warmup_ratio, t.schedule),
        max_grad_norm=t.max_grad_norm, bf16=bf16, per_rank_batch=per_rank * t.accum_steps,
        zero_stage=cfg.dist.zero_stage, deepspeed_config_file=cfg.dist.deepspeed_config,
        coalesce_reduction=cfg.dist.coalesce_reduction)
    logger = Logger(run_dir, world.is_main, t.max_steps, config={**plain, "run": run_record},
                    wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, wandb_mode=cfg.log.wandb_mode,
                    progress=t.progress)
    try:
        return fit(engine, mixture, sources, loss_fn, tasks, logger, FitConfig(
            max_steps=t.max_steps, chunk_size=chunk, accum_steps=t.accum_steps, group_by_length=t.group_by_length,
            mask_duplicates=cfg.data.mask_duplicates, log_every=t.log_every, eval_before=cfg.eval.before,
            eval_every=cfg.eval.every_steps, eval_batch_size=cfg.eval.batch_size,
            eval_dims=list(cfg.eval.dims) if cfg.eval.dims else None, save_every=t.save_every,
            keep_last=t.keep_last, resume_from=resume_from,
            identity={**checkpoint.identity(plain, world.size), **record.data_identity(sources)},
            preempt_signals=list(t.preempt_signals), num_workers=cfg.data.num_workers), run_dir)
    finally:
        logger.close()


def eval_job(cfg: DictConfig, world: dist.World, run_dir: Path) -> dict:
    tasks = build_tasks(cfg.eval.tasks)
    if not tasks:
        raise UserError("recipe=eval has no tasks: choose an eval config (eval=snli) or set eval.tasks")
    encoder = build_encoder(cfg).to(world.device).eval()
    say(f"world size {world.size}: evaluating {cfg.model.path}")
    check_loss(cfg, encoder.dim)
    metrics = run_tasks(tasks, make_embed(encoder, encoder, world, cfg.eval.batch_size),
                        list(cfg.eval.dims) if cfg.eval.dims else None)
    if world.is_main:
        print(side_by_side(None, metrics))
        (run_dir / "eval.json").write_text(json.dumps({"model": cfg.model.path, "metrics": metrics}, indent=2) + "\n")
    return {"after": metrics}


JOBS = {"train": train_job, "eval": eval_job, "mine": mine_job, "merge": merge_job}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.job not in JOBS:
        raise UserError(f"job={cfg.job!r}: expected one of {', '.join(JOBS)}")
    world = dist.init_world(cfg.trainer.device)
    seed_everything(cfg.seed + world.rank)  # dropout differs per rank; data order comes from cfg.seed alone
    if world.is_main:  # config.RunDirCheck has already refused a run dir that cannot be written
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    result = JOBS[cfg.job](cfg, world, run_dir)
    # Every rank leaves together: a rank that is done early (the others while rank 0 writes) would
    # otherwise tear its end of the process group down under rank 0, which can abort the launch.
    dist.barrier()
    return result

