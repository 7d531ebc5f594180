"""Engines: one small class per parallel strategy around the same model, optimizer and schedule.

`wrap()` returns the engine for `dist.strategy`: DDP (also used alone, on one process), FSDP2
(`fully_shard`) and DeepSpeed ZeRO 0-3 (imported only when chosen). An engine offers what a
gradient-cached step needs:

    forward(ids, mask)        the wrapped model's forward, under autocast when asked
    begin_step()              an optimizer step starts (DeepSpeed opens its reduction block)
    no_sync()                 gradient reduction off (every chunk but the last)
    backward(t)               backward through the strategy
    step()                    clip, optimizer step, schedule step, zero grad -> grad norm
    abandons_steps            whether a step may be given up at a chunk boundary: discard_grads()
                              then drops what it accumulated (every engine; see gradcache.Abandoned)
    full_state_dict()         the whole model's weights on rank 0 (sharded strategies gather)
    save_state(folder)        model + optimizer + schedule for a checkpoint (collective)
    load_state(folder)        the same, read back
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from train.dist import World
from train.errors import UserError
from train.model import embedding_dtype


def _autocast(world: World, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(world.device.type, dtype=torch.bfloat16)


def _to(world: World, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The model's positional inputs on the device, a packed forward's `seg` only when given."""
    return [t.to(world.device) for t in tensors if t is not None]


class TorchEngine:
    """One process, or DDP over several. Also the base of FSDP2's engine (which swaps the wrapping)."""

    def __init__(self, model: nn.Module, world: World, make_optimizer: Callable, make_scheduler: Callable,
                 max_grad_norm: float | None, bf16: bool):
        self.world, self.bf16, self.max_grad_norm = world, bf16, max_grad_norm
        self.encoder = model  # unwrapped: tokenizer, spec, save
        self.module = self._wrap(model.to(world.device))
        self.optimizer = make_optimizer(self.module)
        self.scheduler = make_scheduler(self.optimizer)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        # No buffer sync per forward: position-id buffers never change, and a broadcast per
        # forward would cost one collective per chunk (the keyword changed in torch 2.13).
        import inspect

        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        return DDP(model, device_ids=ids, **{no_sync: False})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        # seg: the packed layout's text index per token (train/packing.py); None: padded
        with _autocast(self.world, self.bf16):
            return embedding_dtype(self.module(*_to(self.world, ids, mask, seg)))

    def begin_step(self) -> None:
        """Nothing to open: DDP reduces under the last backward outside no_sync()."""

    # A step can be given up at a chunk boundary (gradcache.Abandoned, on a preemption signal): the
    # gradients accumulated so far, under no_sync(), are all in the parameters' .grad.
    abandons_steps = True

    def discard_grads(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def no_sync(self):
        return self.module.no_sync() if self.world.size > 1 else contextlib.nullcontext()

    def backward(self, t: torch.Tensor) -> None:
        t.backward()

    def step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self) -> dict | None:
        """None: the unwrapped module's own weights are complete and current."""
        return None

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole, reduced gradient (for inspection and tests; collective)."""
        return {n: _full(p.grad) for n, p in self.encoder.named_parameters() if p.grad is not None}

    def _frozen(self) -> set[str]:
        return {n for n, p in self.encoder.named_parameters() if not p.requires_grad}

    def save_state(self, folder: Path) -> None:
        """Model, optimizer and schedule into `folder` (collective; replicas are equal, rank 0 writes).
        Frozen weights are left out: they are model.path's, which a resume must share (a LoRA
        checkpoint of a 7B model is the adapter's size, not the model's)."""
        if self.world.is_main:
            frozen = self._frozen()
            model = {k: v for k, v in self.encoder.state_dict().items() if k not in frozen}
            torch.save({"model": model, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / "state.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location=self.world.device, weights_only=True)
        missing, unexpected = self.encoder.load_state_dict(state["model"], strict=False)
        if unexpected or set(missing) - self._frozen():
            raise ValueError(f"state.pt does not fit this model: unexpected {unexpected[:3]}, "
                             f"missing {sorted(set(missing) - self._frozen())[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FSDP2Engine(TorchEngine):
    """FSDP2 (`fully_shard`): each transformer block and then the whole model sharded.

    A cached step runs every chunk twice and backward once, and by default each of these all-gathers
    every block's parameters: 3 all-gathers per block and chunk. keep_gathered (dist.fsdp_keep_gathered):
    the parameters are not resharded after a forward nor after a backward without gradient sync, so a
    step gathers them once, in its first forward, and reshards them after its last (synced) backward."""

    def __init__(self, *args, keep_gathered: bool = False, **kwargs):
        self.keep_gathered = keep_gathered  # read by _wrap, which the base __init__ calls
        super().__init__(*args, **kwargs)

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        kwargs = {"mp_policy": mp} if mp else {}
        if self.keep_gathered:
            kwargs["reshard_after_forward"] = False
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.bf16 = False  # the policy casts; no autocast on top
        return model

    # A step is given up at a chunk boundary as under DDP: the optimizer has not stepped, and no gradient
    # has been reduced (every backward before the step's last runs under no_sync()). What the step
    # accumulated is not in the sharded .grad that zero_grad() clears but in FSDP2's own per-parameter
    # state: the unsharded gradient (`_unsharded_param.grad`, or `unsharded_accumulated_grad` when a
    # reduce dtype is set), full-size on every rank. It is in no state dict (the checkpoint written next
    # holds parameters and optimizer state only), but a later synced backward would add it to its own
    # gradient (tests/test_dist.py: 1.4 relative off without this) and it holds a whole model's gradient
    # in memory: discard_grads() drops it. FSDP2 has no public call for that; these are torch 2.13's
    # private names, read with getattr so that another torch leaves the gradient in place instead of
    # failing the preemption (the run checkpoints and exits next, so only the memory stays taken), and
    # the test above says when they change.
    abandons_steps = True

    def discard_grads(self) -> None:
        self.module.zero_grad(set_to_none=True)
        for m in self.module.modules():
            state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
            for group in getattr(state, "_fsdp_param_groups", []):
                for p in group.fsdp_params:
                    p.unsharded_accumulated_grad = None
                    if getattr(p, "_unsharded_param", None) is not None:
                        p._unsharded_param.grad = None

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        if self.keep_gathered:  # the next chunk's forward reuses the gathered parameters
            self.module.set_reshard_after_backward(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)
            if self.keep_gathered:
                self.module.set_reshard_after_backward(True)

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _backbone_keys(sd) if self.world.is_main else {}

    def save_state(self, folder: Path) -> None:
        """Each rank writes its own shards of model and optimizer (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))
        if self.world.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, folder / "state.pt")

    def load_state(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(folder / "state.pt", weights_only=True)["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 around the same model, optimizer and schedule.

    Gradient reduction once per optimizer step: ZeRO 1-3 through the engine's
    `coalesce_grad_reduction` (gradients accumulate locally across chunks and one
    reduction runs when the block ends), ZeRO 0 through `no_sync`. The local accumulation
    holds full-size gradients until the step; `coalesce=False` (dist.coalesce_reduction)
    gives ZeRO 2/3 their gradient partitioning back, at one reduce-scatter per chunk. The contrastive
    step is one DeepSpeed micro-batch (gradient_accumulation_steps 1): the chunks and
    accumulated batches are our own and their losses are already scaled.
    """

    def __init__(self, model: nn.Module, world: World, make_optimizer: Callable, make_scheduler: Callable,
                 ds_config: dict, coalesce: bool = True):
        import deepspeed

        self.world, self.encoder = world, model
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.module = self.engine
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self._block, self._coalesce = None, coalesce

    @property
    def abandons_steps(self) -> bool:
        """Whether the step begun can be given up at a chunk boundary (asked after begin_step()).

        Yes under ZeRO 0 (gradients accumulate in .grad under no_sync(), as with DDP), ZeRO 3, and ZeRO 1/2
        inside the coalescing block (gradients accumulate locally in .grad until the block ends). No under
        ZeRO 1/2 with per-chunk reduction (dist.coalesce_reduction=false, or an optimizer wrapper without
        the block): each chunk's reduced gradient is added into the optimizer's partition buffers, which
        only step() empties, and DeepSpeed has no public call to drop them; a step given up would leave them
        to be added to the next one (tests/dist_worker.py's abandoned cases measured it). That step runs to
        its end, as before."""
        return self.stage in (0, 3) or self._block is not None

    def discard_grads(self) -> None:
        """The optimizer has not stepped. The coalescing block opened in begin_step() is closed first
        (inside it DeepSpeed refuses step() and no_sync(), and ZeRO-3 keeps its reduction hooks muted);
        that runs its one reduction, a collective, which is safe because every rank gives the step up at
        the same boundary (the stop flag is agreed). Then the reduced partitions and the local gradients
        are dropped: the next step starts from none (the run checkpoints and exits; DeepSpeed's
        checkpoint holds parameters and optimizer state, no gradient)."""
        self.reduce()
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        return embedding_dtype(self.engine(*_to(self.world, ids, mask, seg)))

    def begin_step(self) -> None:
        """Open the block in which every backward of this optimizer step accumulates locally."""
        if self.stage >= 1 and self._coalesce:
            block = self.engine.coalesce_grad_reduction()
            try:
                block.__enter__()
            except NotImplementedError as e:  # some optimizer wrappers (bf16 on ZeRO 1) lack it
                print(f"train: DeepSpeed cannot coalesce gradient reduction here ({e}); "
                      "gradients are reduced after every chunk instead", file=sys.stderr)
                self._coalesce = False
                return
            self._block = block

    def no_sync(self):
        if self.stage == 0:
            return self.engine.no_sync()
        if self._block is not None:  # coalescing: nothing is reduced before the block ends
            return contextlib.nullcontext()
        return self._inside_accumulation()

    @contextlib.contextmanager
    def _inside_accumulation(self):
        """Per-chunk reduction: these backwards accumulate into the partitioned gradients; the
        step's last backward (outside this context) is the accumulation boundary."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, t: torch.Tensor) -> None:
        self.engine.backward(t, scale_wrt_gas=False)

    def reduce(self) -> None:
        """Close the step's block: the one gradient reduction of this optimizer step."""
        if self._block is not None:
            self._block.__exit__(None, None, None)
            self._block = None

    def full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        self.reduce()
        grads = {n: safe_get_full_grad(p) for n, p in self.engine.module.named_parameters() if p.requires_grad}
        return {n: g.detach().float().cpu().clone() for n, g in grads.items() if g is not None}

    def step(self) -> float:
        self.reduce()
        self.engine.step()  # clips (config gradient_clipping), steps optimizer and schedule
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint: module, ZeRO optimizer partitions per rank, schedule."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {folder / 'deepspeed'}")

    def full_state_dict(self) -> dict | None:
        if self.stage < 3:
            return None
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()} \
                if self.world.is_main else {}
        return _backbone_keys(sd) if self.world.is_main else {}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered whole; a plain tensor as is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()


def _backbone_keys(sd: dict) -> dict:
    """Encoder state dict -> the backbone's own keys, for backbone.save_pretrained(state_dict=...)."""
    return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the items of its largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def read_deepspeed_file(user_file: str) -> dict:
    """A user's DeepSpeed JSON: an object, or one error line naming the file (and line)."""
    import json

    try:
        with open(user_file, encoding="utf-8") as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"dist.deepspeed_config: {user_file}:{e.lineno}: invalid JSON ({e.msg} at column "
                        f"{e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"dist.deepspeed_config={user_file}: {e}; expected a readable UTF-8 JSON file") from None
    if not isinstance(user, dict):
        raise UserError(f"dist.deepspeed_config: {user_file}: expected a JSON object, got {type(user).__name__}")
    return user


def deepspeed_config(stage: int, per_rank_batch: int, world_size: int, max_grad_norm: float | None,
                     bf16: bool, user_file: str | None) -> dict:
    """The DeepSpeed config implied by the trainer's settings, with a user file merged over it.

    A user file that contradicts the trainer's batch settings is refused, naming both values.
    """

    config = {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": per_rank_batch * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # optim._target_ may name any torch optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if user_file:
        user = read_deepspeed_file(user_file)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and user[key] != "auto" and user[key] != config[key]:
                raise UserError(
                    f"{user_file}: {key}={user[key]} contradicts the trainer's batch settings, which need "
                    f"{key}={config[key]} (trainer.batch_size and trainer.accum_steps over {world_size} ranks, one "
                    "DeepSpeed micro-batch per contrastive step); set it to \"auto\" or remove it")
            user.pop(key, None)
        zero = {**config["zero_optimization"], **user.pop("zero_optimization", {})}
        config.update(user)
        config["zero_optimization"] = zero
    return config


def _single_process_group(world: World) -> None:
    """FSDP2 and DeepSpeed need a process group even on one process: make a group of one."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "cpu:gloo,cuda:nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def wrap(model: nn.Module, world: World, strategy: str, make_optimizer: Callable, make_scheduler: Callable,
         max_grad_norm: float | None, bf16: bool, per_rank_batch: int, zero_stage: int = 2,
         deepspeed_config_file: str | None = None, coalesce_reduction: bool = True, fsdp_keep_gathered: bool = False):
    """The engine for `strategy`; `make_optimizer(module)` runs after any sharding."""
    if strategy == "auto":
        strategy = "ddp"
    if strategy == "ddp":
        return TorchEngine(model, world, make_optimizer, make_scheduler, max_grad_norm, bf16)
    if strategy in ("fsdp2", "deepspeed"):
        _single_process_group(world)
    if strategy == "fsdp2":
        return FSDP2Engine(model.to(world.device), world, make_optimizer, make_scheduler, max_grad_norm, bf16,
                           keep_gathered=fsdp_keep_gathered)
    if strategy == "deepspeed":
        if zero_stage not in (0, 1, 2, 3):
            raise UserError(f"dist.zero_stage={zero_stage}: expected 0, 1, 2 or 3")
        cfg = deepspeed_config(zero_stage, per_rank_batch, world.size, max_grad_norm, bf16, deepspeed_config_file)
        return DeepSpeedEngine(model.to(world.device), world, make_optimizer, make_scheduler, cfg,
                               coalesce=coalesce_reduction)
    raise UserError(f"dist.strategy={strategy!r}: expected one of auto, ddp, fsdp2, deepspeed")
