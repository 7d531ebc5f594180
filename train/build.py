"""The composition root: the one place that turns the config into objects and checks the keys
that only make sense together. Jobs (train/jobs/) receive what is built here and their own
config block, never the whole config.

    cfg.model   --> encoder()            Encoder (load, LoRA, pooling, prompts)
                    cross_encoder()      CrossEncoder (model.kind=cross_encoder: a re-ranker)
    cfg.data    --> sources(), Mixture   records with their weight and instruction, the sampler
    cfg.loss    --> loss()               a function of a Pairing (losses.EmbeddingLoss), or of a
                                         cross-encoder's [b, 1+n] scores (losses.rerank_loss)
    cfg.optim   --> optimizer()          torch optimizer over weight-decay groups
    cfg.dist    --> engine()             DDP / FSDP2 / DeepSpeed around encoder + optimizer + schedule
    cfg.eval    --> tasks()              evaluators
    per job     --> training(), evaluation(), mining(), merging()

Data and evaluation sets are read before a model loads: their errors should not wait for it.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from train import card, checkpoint, dist, engines, mining, mteb_eval, packing, record, streaming, synthesis
from train.boundary import first_line, library_errors, optimizer_error, reading
from train.config import recipe_name
from train.cross_encoder import CrossEncoder, load_cross_encoder
from train.data import ALIASES, Mixture, Source, check_shapes, read_source
from train.embed import embedder
from train.errors import UserError
from train.evaluate import RerankTask, build_tasks, defined_tasks, metric_names, rerank_bases
from train.log import Logger, say
from train.lora import trainable_share
from train.losses import EmbeddingLoss, rerank_loss
from train.merge_folders import MergePlan, plan_merge
from train.model import DTYPES, Encoder, freeze_unused, load_encoder
from train.optim import param_groups, schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plain(node) -> dict | list | None:
    """A config node as plain Python values (choices as their strings)."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if node is not None else None


# --- parts -----------------------------------------------------------------------------------------


def encoder(m: DictConfig) -> Encoder:
    """cfg.model -> Encoder; notes on what was changed on the way in (pad tokens) are said once."""
    try:
        enc = load_encoder(
            m.path, pooling=plain_str(m.pooling), normalize=m.normalize, max_length=m.max_length,
            prompts=prompts(m.prompts), dtype=str(m.dtype), attn_implementation=plain_str(m.attn_implementation),
            truncate_dim=m.truncate_dim, bidirectional=m.bidirectional, pool_prompt=m.pool_prompt,
            instruction_template=m.instruction_template, latents=m.latents, latent_heads=m.latent_heads,
            lora_config=plain(m.lora), gradient_checkpointing=m.gradient_checkpointing, quantization=m.quantization,
            save_max_length=m.save_max_length, head=plain_str(m.head))
    except UserError as e:  # name the recipe: a later stage often points at an earlier stage's run
        raise UserError(f"recipe {recipe_name()}: {e}") from e
    except library_errors() as e:  # a folder that transformers, safetensors or tokenizers cannot read
        raise UserError(f"recipe {recipe_name()}: model.path={m.path}: {first_line(e)}; expected a model folder "
                        "that transformers can load") from e
    for note in enc.notes:
        say(note)
    return enc


def cross_encoder(m: DictConfig) -> CrossEncoder:
    """cfg.model (kind cross_encoder) -> CrossEncoder; a bi-encoder folder gets a new head (said once)."""
    try:
        enc = load_cross_encoder(m.path, max_length=m.max_length, save_max_length=m.save_max_length,
                                 dtype=DTYPES[str(m.dtype)], attn_implementation=plain_str(m.attn_implementation))
    except UserError as e:
        raise UserError(f"recipe {recipe_name()}: {e}") from e
    except library_errors() as e:
        raise UserError(f"recipe {recipe_name()}: model.path={m.path}: {first_line(e)}; expected a model folder "
                        "that transformers can load") from e
    for note in enc.notes:
        say(note)
    say(f"pairs cut at {enc.max_length} tokens in training; the saved model's max length: {enc.save_max_length} "
        "(model.save_max_length)")
    return enc


def check_cross_encoder(cfg: DictConfig) -> None:
    """Settings of the embedder that a cross-encoder has no use for are refused, not ignored."""
    m, lo = cfg.model, cfg.loss
    # A model config written for embedders (model=tiny_bert: pooling mean) still serves: how to pool
    # is said to go unused; what would change the trained model or its memory is refused.
    unused = [f"model.{k}={plain(m[k]) if OmegaConf.is_config(m[k]) else m[k]}" for k in ("pooling", "normalize",
                                                                                          "prompts")
              if m[k] is not None]
    if unused:
        say(f"{', '.join(unused)}: not used by a cross-encoder (model.kind=cross_encoder)")
    embedder_only = {"model.head": m.head, "model.lora": m.lora, "model.truncate_dim": m.truncate_dim,
                     "model.quantization": m.quantization, "loss.matryoshka_dims": lo.matryoshka_dims,
                     "trainer.chunk_tokens": cfg.trainer.chunk_tokens}
    for key, value in embedder_only.items():
        if value is not None:
            raise UserError(f"{key}={plain(value) if OmegaConf.is_config(value) else value} is an embedder's "
                            "setting; model.kind=cross_encoder has none (remove it)")
    if cfg.trainer.packing == "on":
        raise UserError("trainer.packing=on: packed forwards are an embedder's; a cross-encoder "
                        "(model.kind=cross_encoder) reads each (query, passage) pair padded (remove it)")
    if lo.distill_weight:
        raise UserError(f"loss.distill_weight={lo.distill_weight}: distillation trains an embedder; a cross-encoder "
                        "(model.kind=cross_encoder) trains with loss.rerank=listwise or pointwise")


def check_rerank_data(loss_kind: str, srcs: list[Source]) -> None:
    """Both re-ranker losses score each query's positive against its negatives: data without
    negatives (pairs, single texts) has nothing to rank."""
    for s in srcs:
        if s.positives is None or not s.num_negatives:
            has = "single texts" if s.positives is None else "(query, positive) pairs without negatives"
            raise UserError(f"recipe {recipe_name()} (loss.rerank={loss_kind}) needs each query's positive and "
                            f"negatives, but source {s.name!r} ({s.origin}) has {has}: expected a negatives field "
                            f"named one of {', '.join(ALIASES['negatives'])} (mine them: recipe=mine_hard_negatives)")


def prompts(node) -> dict[str, str] | None:
    """cfg.model.prompts: None (the folder's) or a mapping of side (query, passage) to prefix."""
    value = plain(node) if OmegaConf.is_config(node) else node
    if value is None or (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in value.items())):
        return value
    raise UserError(f"model.prompts={value!r}: expected a mapping of side to prefix, e.g. "
                    "model.prompts='{query: \"query: \", passage: \"passage: \"}'")


def plain_str(value) -> str | None:
    return None if value is None else str(value)


def optimizer(optim: DictConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    """`optim._target_` (a torch optimizer class) over decay / no-decay parameter groups."""
    kwargs = plain(optim)
    target = kwargs.pop("_target_")
    try:
        cls = get_class(target)
    except (ImportError, ValueError, AttributeError) as e:
        raise UserError(f"optim._target_={target}: {first_line(e)}; expected a torch optimizer class") from e
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return cls(param_groups(module, kwargs["weight_decay"]), **kwargs)
    except (ValueError, TypeError) as e:  # torch checks the values: lr >= 0, 0 <= betas < 1, ...
        raise optimizer_error(e, target, kwargs) from e


def check_optim(optim: DictConfig, t: DictConfig) -> None:
    """The optimizer and schedule settings, checked on a stand-in parameter before any model loads.
    The stand-in's initialisation draws from torch's generator: forked, so the run's dropout streams
    (and its figures) are what they would be without the check."""
    with torch.random.fork_rng(devices=[]):
        stand_in = optimizer(optim, torch.nn.Linear(1, 1))
    schedule(stand_in, t.max_steps, t.warmup_ratio, str(t.schedule))


def loss(loss_cfg: DictConfig, kind: str = "embedder") -> Callable:
    """The training loss of a Pairing (InfoNCE, distillation and Matryoshka terms as configured), or for
    kind=cross_encoder of the [b, 1+n] scores of each query's positive and negatives."""
    kwargs = plain(loss_cfg)
    rerank = kwargs.pop("rerank", None)
    if kind == "cross_encoder":
        return functools.partial(rerank_loss, kind=rerank or "listwise")
    if rerank:
        raise UserError(f"loss.rerank={rerank} is a cross-encoder's loss: set model.kind=cross_encoder "
                        "(recipe=reranker), or remove it")
    return EmbeddingLoss(**kwargs)


def sources(data: DictConfig, loss_cfg: DictConfig, world: dist.World | None = None, seed: int = 0) -> list[Source]:
    """`data.path` stands for a single source and replaces `data.sources`. With data.streaming (training
    only: `world` given), each source is this rank's part of a stream (streaming.py)."""
    if data.path:
        specs = {"main": OmegaConf.structured({"path": data.path, "limit": data.limit})}
    else:
        specs = dict(data.sources)
    if not specs:
        raise UserError("no training data: set data.path=FILE or choose a data config with sources (data=...)")
    if data.num_proc < 1 or data.num_workers < 0:
        raise UserError(f"data.num_proc={data.num_proc}, data.num_workers={data.num_workers}: expected num_proc >= 1 "
                        "and num_workers >= 0")
    if data.streaming and world is None:
        raise UserError(f"data.streaming=true: recipe {recipe_name()} indexes its records (mining, the merge search); "
                        "streaming is for training, set data.streaming=false")
    out = []
    for name, s in specs.items():
        common = {"fields": dict(s.get("fields") or {}), "num_negatives": s.get("num_negatives"),
                  "limit": s.get("limit"), "subset": s.get("subset"), "split": s.get("split", "train"),
                  "data_files": s.get("data_files"), "weight": s.get("weight"),
                  "homogeneous": bool(s.get("homogeneous", False)), "instruction": s.get("instruction")}
        with reading(f"data source {name!r} ({s.path})", path=s.path, expected="a readable data file"):
            if data.streaming:
                out.append(streaming.stream_source(name, s.path, rank=world.rank, world=world.size, seed=seed,
                                                   buffer=data.shuffle_buffer, **common))
            else:
                out.append(read_source(name, s.path, cache_dir=data.cache_dir, num_proc=data.num_proc, **common))
    check_shapes(out)
    check_fields(data, loss_cfg, out)
    return out


def check_fields(data: DictConfig, loss_cfg: DictConfig, srcs: list[Source]) -> None:
    """Refuse data that lacks what the recipe trains on: hard negatives where `data.require`
    lists them (supervised SimCSE), teacher scores when distillation is on."""
    need = {role: "data.require" for role in data.require}
    if loss_cfg.distill_weight:
        need["scores"] = f"loss.distill_weight={loss_cfg.distill_weight}"
    for role, why in need.items():
        if role not in ("negatives", "scores"):
            raise UserError(f"data.require: unknown field {role!r}; expected negatives or scores")
        for s in srcs:
            if (s.num_negatives if role == "negatives" else s.has_scores):
                continue
            raise UserError(f"recipe {recipe_name()} needs {role} ({why}), but source {s.name!r} ({s.origin}) "
                            f"has none: expected a field named one of {', '.join(ALIASES[role])} "
                            f"(or set the source's fields.{role})")


def tasks(eval_cfg: DictConfig) -> list:
    with reading("eval.tasks", expected="readable evaluation files"):
        return build_tasks(eval_cfg.tasks)


def rerank_tasks(eval_cfg: DictConfig, world: dist.World) -> list[RerankTask]:
    """Each rerank task's candidates: its retriever's top k documents per query, embedded sharded over
    the ranks, once, before the cross-encoder loads."""
    with reading("eval.tasks", expected="readable evaluation files"):
        bases = rerank_bases(eval_cfg.tasks)
    out = []
    for name, base, retriever, k in bases:
        try:
            enc = load_encoder(retriever).to(world.device).eval()
        except UserError as e:
            raise UserError(f"eval.tasks.{name}.retriever: {e}") from e
        out.append(RerankTask(name, base, base.top_k(embedder(enc, world, eval_cfg.batch_size), k)))
    return out


def eval_dims(eval_cfg: DictConfig) -> list[int] | None:
    return list(eval_cfg.dims) if eval_cfg.dims else None


def check_selection(eval_cfg: DictConfig, evaluators: list) -> None:
    """eval.every / eval.select / eval.keep_last: refused up front when they cannot work together."""
    if eval_cfg.every < 0:
        raise UserError(f"eval.every={eval_cfg.every}: expected 0 (before and after only) or a number of steps")
    if eval_cfg.keep_last and not eval_cfg.select:
        raise UserError("eval.keep_last=true saves the last step beside the selected one: set eval.select=METRIC")
    if not eval_cfg.select:
        return
    if not eval_cfg.every:
        raise UserError(f"eval.select={eval_cfg.select} chooses among the evaluations during training: "
                        "set eval.every=N (steps)")
    names = metric_names(evaluators, eval_dims(eval_cfg))
    if eval_cfg.select not in names:
        raise UserError(f"eval.select={eval_cfg.select}: not a metric of the evaluation tasks; expected one of "
                        f"{', '.join(names) or '(none: no eval.tasks)'}")


def lengths_line(spec) -> str:
    """Training truncation and the saved model's inference length differ on purpose: both are said."""
    kept = spec.save_max_length or spec.max_length
    return (f"texts cut at {spec.max_length} tokens in training; the saved model's max_seq_length: {kept} "
            "(model.save_max_length)")


def check_loss(loss_cfg: DictConfig, eval_cfg: DictConfig, dim: int) -> None:
    """Matryoshka prefixes (trained and evaluated) must fit the model's dimension."""
    dims, weights = loss_cfg.matryoshka_dims or [], loss_cfg.matryoshka_weights
    for key in ("temperature", "teacher_temperature"):
        if key in loss_cfg and not loss_cfg[key] > 0:
            raise UserError(f"loss.{key}={loss_cfg[key]}: expected a positive number (scores are divided by it)")
    for key, values in (("loss.matryoshka_dims", dims), ("eval.dims", eval_cfg.dims or [])):
        for d in values:
            if not 0 < d <= dim:
                raise UserError(f"{key}: {d} is not between 1 and the model's dimension {dim}")
    if weights is not None and len(weights) != len(dims):
        raise UserError(f"loss.matryoshka_weights has {len(weights)} values for "
                        f"{len(dims)} loss.matryoshka_dims; expected one weight per dimension")


def check_strategy(cfg: DictConfig) -> None:
    """LoRA adapters, latent-attention weights and the MLP head are saved from the unsharded module."""
    if cfg.dist.fsdp_keep_gathered and cfg.dist.strategy != "fsdp2":
        raise UserError(f"dist.fsdp_keep_gathered=true with dist.strategy={cfg.dist.strategy}: it keeps FSDP2's "
                        "parameters gathered through a step; expected dist.strategy=fsdp2 (or leave it false)")
    sharded = cfg.dist.strategy == "fsdp2" or (cfg.dist.strategy == "deepspeed" and cfg.dist.zero_stage == 3)
    head = cfg.model.head not in (None, "none")
    if sharded and (cfg.model.lora is not None or cfg.model.pooling == "latent" or head):
        what = ("model.lora" if cfg.model.lora is not None else f"model.head={cfg.model.head}" if head
                else "model.pooling=latent")
        raise UserError(f"{what} with dist.strategy={cfg.dist.strategy}"
                        f"{' zero_stage=3' if cfg.dist.strategy == 'deepspeed' else ''} is not supported: "
                        "use dist.strategy=ddp (LoRA keeps the trainable state small enough for it)")


def check_batch(t: DictConfig, world_size: int) -> tuple[int, int]:
    """(examples per rank, examples per forward): refuse impossible combinations up front."""
    for key in ("max_steps", "batch_size", "accum_steps", "log_every"):
        if t[key] < 1:
            raise UserError(f"trainer.{key}={t[key]}: expected a positive integer")
    for key in ("save_every", "keep_last"):
        if t[key] < 0:
            raise UserError(f"trainer.{key}={t[key]}: expected 0 or a positive integer")
    if t.batch_size % world_size:
        raise UserError(f"trainer.batch_size={t.batch_size} is not divisible by the world size {world_size}: "
                        "the global batch is split evenly over the ranks")
    per_rank = t.batch_size // world_size
    chunk = t.chunk_size if t.chunk_size is not None else per_rank
    if chunk < 1:
        raise UserError(f"trainer.chunk_size={chunk}: expected a positive integer (examples per forward pass)")
    # A chunk that holds the whole per-rank batch (a recipe's chunk with a smaller batch on the command
    # line) simply means no caching: the start-up line says so.
    chunk = min(chunk, per_rank)
    if t.chunk_tokens is not None and t.chunk_tokens < 1:
        raise UserError(f"trainer.chunk_tokens={t.chunk_tokens}: expected a positive number of tokens")
    return per_rank, chunk


def check_chunk_tokens(t: DictConfig, max_length: int, strategy: str = "single") -> None:
    """A budget below the longest text would give every long text a chunk of its own, over budget.
    Under sharded parameters every forward is a collective (an all-gather), so every rank must run as
    many forwards; chunks cut by a budget follow each rank's own lengths, and their count differs."""
    if t.chunk_tokens is not None and strategy in ("fsdp2", "deepspeed"):
        raise UserError(f"trainer.chunk_tokens={t.chunk_tokens} with dist.strategy={strategy}: every forward "
                        "gathers the sharded parameters, so all ranks must run as many chunks, which a token "
                        "budget does not keep; use trainer.chunk_size (or dist=ddp)")
    if t.chunk_tokens is not None and t.chunk_tokens < max_length:
        raise UserError(f"trainer.chunk_tokens={t.chunk_tokens} is less than one text of model.max_length="
                        f"{max_length} tokens; expected at least {max_length}")


def use_packing(t: DictConfig, enc: Encoder, device: torch.device, strategy: str = "ddp") -> bool:
    """trainer.packing -> whether forwards are packed (train/packing.py). `on` refuses an encoder
    that has no packed form. `auto` packs where it was measured faster than padded length-grouped
    chunks (docs/benchmarks.md): a BERT-family encoder on CPU (sdpa, eager); and on CUDA with flash
    attention's varlen kernels, the path the issue asks for (not yet run on a GPU here). Elsewhere
    (decoders on CPU, sdpa/eager on CUDA: a dense 4D mask there) packing is unmeasured: padded."""
    why = enc.packing_refusal()
    if strategy in ("fsdp2", "deepspeed"):
        # Sharded parameters: every forward all-gathers them, so all ranks must run as many forwards;
        # packed chunks follow each rank's own lengths and their count differs between ranks.
        why = (f"dist.strategy={strategy} needs the same number of forwards on every rank, which packed "
               "chunks do not keep")
    if str(t.packing) == "on" and why:
        raise UserError(f"trainer.packing=on: {why}; expected trainer.packing=off or auto for this model")
    if str(t.packing) == "off" or why:
        return False
    flash = enc.backbone.config._attn_implementation in packing.FLASH
    return str(t.packing) == "on" or flash or (device.type == "cpu" and not enc.decoder)


def use_bf16(precision: str, world: dist.World) -> bool:
    if precision == "fp32":
        return False
    cuda_bf16 = world.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and world.device.type == "cuda" and not cuda_bf16:
        raise UserError("trainer.precision=bf16, but this CUDA device has no bfloat16 support")
    return cuda_bf16 or precision == "bf16"


def engine(cfg: DictConfig, enc: Encoder, world: dist.World, per_rank: int):
    """The strategy's engine around the encoder, with its optimizer and schedule."""
    t = cfg.trainer
    return engines.wrap(
        enc, world, str(cfg.dist.strategy),
        make_optimizer=lambda module: optimizer(cfg.optim, module),
        make_scheduler=lambda opt: schedule(opt, t.max_steps, t.warmup_ratio, str(t.schedule)),
        max_grad_norm=t.max_grad_norm, bf16=use_bf16(str(t.precision), world),
        per_rank_batch=per_rank * t.accum_steps,
        zero_stage=cfg.dist.zero_stage, deepspeed_config_file=cfg.dist.deepspeed_config,
        coalesce_reduction=cfg.dist.coalesce_reduction, fsdp_keep_gathered=cfg.dist.fsdp_keep_gathered)


# --- per job ---------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """What the training loop needs from the trainer/eval/data configs, as plain values."""

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
    chunk_tokens: int | None = None  # padded tokens per forward pass; None: chunk_size alone
    packed: bool = False  # packed forwards (trainer.packing, resolved for this encoder)
    row_tokens: int | None = None  # packed rows' length; None: the rank's longest text (contrastive_step)
    gather_queries: bool = True  # the loss reads other ranks' queries (loss.symmetric)
    select: str | None = None  # a metric: model/ is the best evaluated step by it
    keep_last_model: bool = False  # with select: the last step's model as model-last/ too
    save_every: int = 0  # checkpoint every N steps; 0: only on a preemption signal
    keep_last: int = 2
    cross_encoder: bool = False  # a re-ranker: rerank.rerank_step on (query, passage) pairs, not contrastive_step
    resume_from: list[Path] = field(default_factory=list)  # checkpoints to try, newest first
    identity: dict = field(default_factory=dict)  # settings a checkpoint must share (checkpoint.IDENTITY_KEYS)
    preempt_signals: list[str] = field(default_factory=list)
    num_workers: int = 0  # threads preparing batches ahead of the step (data.num_workers)


@dataclass
class Training:
    """What the train job runs: the engine (model, optimizer, schedule), data, loss, evaluators."""

    engine: object
    mixture: Mixture
    sources: list[Source]
    loss_fn: Callable
    tasks: list
    logger: Logger
    fit: FitConfig
    run_dir: Path
    card: card.CardInfo | None = None  # rank 0: what model/README.md says besides the results


def given_overrides() -> list[str]:
    """The command line's overrides of this Hydra run; [] outside one (called from Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def card_info(cfg: DictConfig, run_dir: Path, run_record: dict, enc: Encoder, world_size: int) -> card.CardInfo:
    overrides = []
    for given in given_overrides():
        key, _, value = given.lstrip("+~").partition("=")
        node = OmegaConf.select(cfg, key, default=None)
        resolved = value if node is None or OmegaConf.is_dict(node) else plain(node) if OmegaConf.is_list(node) \
            else node  # a group choice (data=...) is itself the resolved value
        overrides.append((given, str(resolved)))
    t = cfg.trainer
    if isinstance(enc, CrossEncoder):
        model = {"kind": "cross-encoder", "labels": enc.num_labels, "max_length (saved)": enc.save_max_length,
                 "max_length (training)": enc.max_length}
    else:
        spec = enc.spec
        model = {"pooling": spec.pooling, "normalize": spec.normalize, "head": spec.head, "dimension": enc.dim,
                 "max_seq_length (saved)": spec.save_max_length or spec.max_length,
                 "max_length (training)": spec.max_length, "prompts": dict(spec.prompts) or "none"}
    training_values = {"steps": t.max_steps, "global batch": t.batch_size, "world size": world_size,
                       "strategy": str(cfg.dist.strategy), "lr": cfg.optim.lr,
                       "weight decay": cfg.optim.weight_decay, "schedule": f"{t.schedule}, warmup {t.warmup_ratio}",
                       "loss": ", ".join(f"{k} {v}" for k, v in plain(cfg.loss).items() if v is not None)}
    tasks = {name: {"kind": str(task.kind), "path": task.path, "limit": task.limit}
             for name, task in defined_tasks(cfg.eval.tasks).items()}  # not the ones tuned for another eval config
    return card.CardInfo(name=run_dir.resolve().name, recipe=recipe_name(), command=run_record["command"],
                         base_model=str(cfg.model.path), overrides=overrides, model=model, training=training_values,
                         data=run_record.get("data") or {}, tasks=tasks, git=run_record.get("git"),
                         versions=run_record.get("versions") or {}, cross_encoder=isinstance(enc, CrossEncoder))


def check_float64(cfg: DictConfig, device: torch.device) -> None:
    """model.dtype=float64 is a CPU setting for exact comparisons (a resume on another world size
    against the uninterrupted run: reductions in another order differ by float32 rounding, which
    Adam turns into full-size steps on ~0 gradients); where it cannot hold or buys nothing, refused."""
    if str(cfg.model.dtype) != "float64":
        return
    why = ("runs on CUDA at a small fraction of float32's speed" if device.type == "cuda" else
           "with trainer.precision=bf16 the forward runs in bfloat16 anyway" if str(cfg.trainer.precision) == "bf16"
           else "with model.quantization the base weights are 4-bit" if cfg.model.quantization else
           "DeepSpeed keeps its own float32/bf16 partitions" if cfg.dist.strategy == "deepspeed" else "")
    if why:
        raise UserError(f"model.dtype=float64 {why}; it is a CPU training precision for exact comparisons "
                        "(dist.strategy ddp or fsdp2, trainer.precision auto or fp32): expected model.dtype=float32")


def training(cfg: DictConfig, world: dist.World, run_dir: Path) -> Training:
    t = cfg.trainer
    cross = cfg.model.kind == "cross_encoder"
    per_rank, chunk = check_batch(t, world.size)
    check_strategy(cfg)
    check_float64(cfg, world.device)
    if cross:
        check_cross_encoder(cfg)
    strategy = cfg.dist.strategy if cfg.dist.strategy != "auto" else ("ddp" if world.size > 1 else "single process")
    budget = f", at most {t.chunk_tokens:,} padded tokens" if t.chunk_tokens is not None else ""
    caching = "gradient cache" if chunk < per_rank else \
        "gradient cache when a batch exceeds the budget" if t.chunk_tokens is not None else "no caching"
    if cross:  # a per-query loss: chunks are forwarded and backpropagated one by one (rerank.py)
        caching = "cross-encoder: chunks of whole queries, no cache needed" if chunk < per_rank else "one forward"
    if (t.chunk_size or 0) > per_rank:
        caching += f": trainer.chunk_size={t.chunk_size} holds the whole per-rank batch"
    say(f"world size {world.size} (rank {world.rank}, device {world.device}), strategy {strategy}, "
        f"global batch {t.batch_size} = {world.size} x {per_rank}, chunk {chunk}{budget} ({caching})")

    srcs = sources(cfg.data, cfg.loss, world, cfg.seed)
    for s in srcs:
        if world.is_main:
            say(s.describe())
    loss_fn = loss(cfg.loss, str(cfg.model.kind))
    if cross:
        check_rerank_data(str(cfg.loss.rerank or "listwise"), srcs)
    mixing = streaming.StreamMixture if cfg.data.streaming else Mixture
    mixture = mixing.of(srcs, t.batch_size, cfg.seed, cfg.data.temperature)
    evaluators = rerank_tasks(cfg.eval, world) if cross else tasks(cfg.eval)
    check_optim(cfg.optim, t)
    if cfg.dist.strategy == "deepspeed" and cfg.dist.deepspeed_config:
        engines.read_deepspeed_file(cfg.dist.deepspeed_config)
    check_selection(cfg.eval, evaluators)
    resume_from = checkpoint.candidates(t.resume, run_dir)
    resolved = plain(cfg)
    run_record = None
    if world.is_main:
        fingerprints = record.data_fingerprints(srcs, full=cfg.data.fingerprint == "full")
        run_record = record.write(run_dir, fingerprints, world.size, str(resume_from[0]) if resume_from else None)

    enc = cross_encoder(cfg.model).to(world.device) if cross else embedding_model(cfg, world)
    packed = not cross and use_packing(t, enc, world.device, str(cfg.dist.strategy) if world.size > 1 else "single")
    row_tokens = packing.row_tokens(enc.spec.max_length, t.chunk_tokens) if packed else None
    if world.is_main and not cross:
        rows = f"rows of model.max_length={row_tokens}" if row_tokens else "rows as long as the longest text"
        say(f"forwards: {f'packed, {rows}' if packed else 'padded chunks'} (trainer.packing={t.packing})")
    eng = engine(cfg, enc, world, per_rank)
    logger = Logger(run_dir, world.is_main, t.max_steps, config={**resolved, "run": run_record},
                    wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, wandb_mode=str(cfg.log.wandb_mode),
                    progress=t.progress)
    fit = FitConfig(
        max_steps=t.max_steps, chunk_size=chunk, chunk_tokens=t.chunk_tokens, gather_queries=cfg.loss.symmetric,
        accum_steps=t.accum_steps,
        group_by_length=t.group_by_length, packed=packed, row_tokens=row_tokens,
        mask_duplicates=cfg.data.mask_duplicates, log_every=t.log_every, eval_before=cfg.eval.before,
        eval_every=cfg.eval.every, eval_batch_size=cfg.eval.batch_size, eval_dims=eval_dims(cfg.eval),
        select=cfg.eval.select, keep_last_model=cfg.eval.keep_last,
        save_every=t.save_every, keep_last=t.keep_last, resume_from=resume_from,
        identity={**checkpoint.identity(resolved, world.size), **record.data_identity(srcs)},
        preempt_signals=list(t.preempt_signals), num_workers=cfg.data.num_workers, cross_encoder=cross)
    info = card_info(cfg, run_dir, run_record, enc, world.size) if world.is_main else None
    return Training(eng, mixture, srcs, loss_fn, evaluators, logger, fit, run_dir, info)


def embedding_model(cfg: DictConfig, world: dist.World) -> Encoder:
    """The embedder to train, its unused parameters frozen, its lengths and loss checked against it."""
    enc = encoder(cfg.model).to(world.device)
    frozen = freeze_unused(enc)  # on the device: the probe's gradients are cheap there
    trainable, total = trainable_share(enc)
    if world.is_main and trainable < total:
        say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if frozen and world.is_main:
        say(f"froze {len(frozen)} parameters the embedding never uses ({', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''})")
    if world.is_main:
        say(lengths_line(enc.spec))
    check_loss(cfg.loss, cfg.eval, enc.dim)
    check_chunk_tokens(cfg.trainer, enc.spec.max_length, str(cfg.dist.strategy) if world.size > 1 else "single")
    return enc


@dataclass
class Evaluation:
    encoder: Encoder
    tasks: list
    batch_size: int
    dims: list[int] | None
    model: str  # as the user named it
    mteb_tasks: list = field(default_factory=list)  # eval=mteb: mteb task objects (train/mteb_eval.py)
    mteb_instructions: bool = False


def evaluation(cfg: DictConfig, world: dist.World) -> Evaluation:
    evaluators = tasks(cfg.eval)
    m = cfg.eval.mteb
    mteb_tasks = mteb_eval.resolve(list(m.tasks), m.benchmark) if m is not None else []  # before the model loads
    if not evaluators and not mteb_tasks:
        raise UserError("recipe=eval has no tasks: choose an eval config (eval=snli, eval=mteb) or set eval.tasks")
    enc = encoder(cfg.model).to(world.device).eval()
    check_loss(cfg.loss, cfg.eval, enc.dim)
    return Evaluation(enc, evaluators, cfg.eval.batch_size, eval_dims(cfg.eval), cfg.model.path, mteb_tasks,
                      bool(m.instructions) if m is not None else False)


@dataclass
class Mining:
    """What the mining job runs: records, corpus, the selection rule, and the encoder to load."""

    settings: DictConfig  # cfg.mine
    rule: mining.Rule
    source: Source
    corpus: mining.Corpus
    make_encoder: Callable[[], Encoder]  # loaded once the inputs passed their checks
    model: str


def mine_rule(m: DictConfig, seed: int) -> mining.Rule:
    return mining.Rule(skip=m.skip, window=m.window, num_negatives=m.num_negatives, sample=m.sample,
                       max_score=m.max_score, margin_pos=m.margin_pos, perc_pos=m.perc_pos, seed=seed)


def mining_records(cfg: DictConfig) -> Source:
    """The (query, positive) records, read as the trainer reads them (same fields and aliases)."""
    try:
        srcs = sources(cfg.data, cfg.loss)
    except UserError as e:
        if cfg.data.path and re.search(r'field ".*" is empty', str(e)):
            raise UserError(mining.count_empty(cfg.data.path)) from e
        raise
    if len(srcs) != 1:
        raise UserError(f"mining reads one source, the data config has {len(srcs)} "
                        f"({', '.join(s.name for s in srcs)}); set data.path=FILE")
    source = srcs[0]
    if source.positives is None:
        raise UserError(f"{source.origin}: mining needs (query, positive) records; these are single texts "
                        f"(expected a positive field named one of {', '.join(ALIASES['positive'])})")
    return source


def mine_inputs(cfg: DictConfig) -> Mining:
    m = cfg.mine
    for key in ("batch_size", "teacher_batch_size", "teacher_max_length", "query_chunk", "doc_chunk"):
        if m[key] < 1:
            raise UserError(f"mine.{key}={m[key]}: expected a positive integer")
    if m.faiss:
        mining.faiss_module()  # refused now, not after the encoding
    rule = mine_rule(m, cfg.seed)
    source = mining_records(cfg)
    corpus = mining.read_corpus(m.corpus, m.text_field, m.id_field) if m.corpus else mining.corpus_of(source)
    return Mining(m, rule, source, corpus, lambda: encoder(cfg.model), cfg.model.path)


@dataclass
class Synthesis:
    """What the synthesize job runs: the passages, where the shards go, and the retriever to load."""

    settings: DictConfig  # cfg.synth
    corpus: mining.Corpus  # every passage: the filter ranks among all of them
    sources: int  # the first `sources` passages get a query (synth.limit)
    out: Path
    seed: int
    make_encoder: Callable[[], Encoder]  # the filter's retriever, loaded after generation
    model: str


def synthesize_inputs(cfg: DictConfig, run_dir: Path) -> Synthesis:
    """Every check of the inputs, before a model loads or a file is written."""
    s = cfg.synth
    for key in ("max_passage_tokens", "max_new_tokens", "max_task_tokens", "queries_per_passage", "batch_size",
                "shard_size", "top_k", "batch_size_filter"):
        if s[key] < 1:
            raise UserError(f"synth.{key}={s[key]}: expected a positive integer")
    for key, low in (("num_negatives", 0), ("temperature", 0)):
        if s[key] < low:
            raise UserError(f"synth.{key}={s[key]}: expected {low} or more")
    if s.limit is not None and s.limit < 1:
        raise UserError(f"synth.limit={s.limit}: expected a positive integer or null (every passage)")
    if not s.corpus:
        raise UserError("synth.corpus is not set: expected a file of passages (JSONL/CSV/Parquet/text with a "
                        "text field), e.g. synth.corpus=passages.jsonl")
    if not s.generator:
        raise UserError("synth.generator is not set: expected an instruction-tuned causal LM folder or hub name")
    synthesis.check_template(s.prompt, s.task_prompt)
    if s.queries_per_passage > 1 and s.temperature == 0:
        raise UserError(f"synth.queries_per_passage={s.queries_per_passage} with synth.temperature=0: greedy "
                        "decoding writes the same query every time; set synth.temperature > 0 (e.g. 0.7)")
    synthesis.check_causal_lm(s.generator)
    corpus = mining.read_corpus(s.corpus, s.text_field, s.id_field, group="synth")
    need = s.top_k + s.num_negatives + 1
    if len(corpus.texts) < need:
        raise UserError(f"synth.corpus={corpus.origin}: {len(corpus.texts):,} passages, but synth.top_k={s.top_k} "
                        f"+ synth.num_negatives={s.num_negatives} + 1 = {need} are needed to rank against")
    sources = min(s.limit or len(corpus.texts), len(corpus.texts))
    out = Path(s.out).expanduser() if s.out else run_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"synth.out={out}: is a file, expected a folder (new, or one to resume)")
    return Synthesis(s, corpus, sources, out, cfg.seed, lambda: encoder(cfg.model), cfg.model.path)


@dataclass
class Merging:
    """What the merge job runs: the checked plan, where it goes, and (for a search) how to score."""

    settings: DictConfig  # cfg.merge
    plan: MergePlan
    out: Path
    tasks: list
    eval_batch_size: int
    search_data: Callable[[], tuple[list[Source], Mixture]] | None  # merge.search=gradient: batches ...
    loss_fn: Callable  # ... and the loss the coefficients are trained on
    mask_duplicates: bool


def merging(cfg: DictConfig, world: dist.World, run_dir: Path) -> Merging:
    m = cfg.merge
    if world.size > 1:
        raise UserError(f"job=merge runs in one process; it was launched on {world.size}")
    plan = plan_merge(list(m.models), str(m.method), list(m.weights) if m.weights is not None else None, m.base,
                      m.spec_from, m.scale, m.density, m.drop_rate, cfg.seed, m.check_adapter_base)
    out = Path(m.out).expanduser() if m.out else run_dir / "model"
    if out.exists() and not (out / "config.json").is_file() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"merge.out={out}: exists and is not a model folder; refusing to replace it "
                        "(expected a new folder, an empty one or an earlier model)")

    def search_data() -> tuple[list[Source], Mixture]:
        srcs = sources(cfg.data, cfg.loss)
        return srcs, Mixture.of(srcs, m.search_batch_size, cfg.seed, cfg.data.temperature)

    return Merging(m, plan, out, tasks(cfg.eval), cfg.eval.batch_size,
                   search_data if m.search == "gradient" else None, loss(cfg.loss), cfg.data.mask_duplicates)
