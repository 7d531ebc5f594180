"""The world of processes and the collectives: with engines.py, the only modules besides
gradcache.py, embed.py and the loop that touch torch.distributed.

`init_world()` joins the process group that torchrun / accelerate launch / deepspeed / srun
describe in the environment (`from_slurm()` maps SLURM's variables) and returns the `World`
(rank, size, device). The collectives below are what the loss, evaluation and the loop's
agreement between ranks need; each is the identity on one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from train.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_slurm() -> None:
    """Tasks started by srun itself, one per GPU (launch/slurm.sbatch, the submitit launcher): torch's
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from SLURM's variables. Only with TRAIN_FROM_SLURM=1, so an
    interactive `python -m train` inside an allocation stays one process."""
    env = os.environ
    if env.get("TRAIN_FROM_SLURM") != "1" or "RANK" in env:
        return
    try:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
    except KeyError as e:
        raise UserError(f"TRAIN_FROM_SLURM=1 but {e.args[0]} is not set: start the processes with srun") from None
    if "MASTER_ADDR" not in env:
        import subprocess

        hosts = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
                               capture_output=True, text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))


def env_world_size() -> int:
    from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout() -> datetime.timedelta:
    """How long a collective may wait before failing instead of hanging: TRAIN_DIST_TIMEOUT_S."""
    return datetime.timedelta(seconds=int(os.environ.get("TRAIN_DIST_TIMEOUT_S", "600")))


def init_process_group() -> None:
    """Join the group the launcher (torchrun, accelerate, deepspeed, srun) describes in the
    environment. Called before Hydra composes, so that all ranks can agree on one run dir."""
    if env_world_size() > 1 and not dist.is_initialized():
        # CPU tensors always go through gloo; CUDA tensors through NCCL when there is a GPU.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout())


def init_world(device: str = "auto") -> World:
    size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda, but no CUDA device is available")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    init_process_group()
    rank = dist.get_rank() if size > 1 else 0
    if size > 1 and dist.get_world_size() != size:
        raise RuntimeError(f"WORLD_SIZE={size} but the process group has {dist.get_world_size()} ranks")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


# --- collectives used by the loss and evaluation ---------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slot back to its owner (summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [W*n, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # reduced in place: never touch autograd's own buffer
        if grad.is_cuda:
            out = torch.empty_like(grad[: ctx.n])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep our slot
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _alone(world: World | None) -> bool:
    """Nothing to gather: no process group, a group of one, or a one-rank world inside a larger group
    (rank 0's single-process teacher in a multi-rank mining job)."""
    return (world is not None and world.size == 1) or not dist.is_initialized() or dist.get_world_size() == 1


def gather_with_grad(x: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """[n, ...] on each rank -> [W*n, ...] in rank order; gradient reaches the local slot."""
    if _alone(world):
        return x
    return _GatherWithGrad.apply(x)


def gather(x: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """[n, ...] on each rank -> [W*n, ...] in rank order, no gradient."""
    if _alone(world):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: int, device: torch.device) -> int:
    """The largest of every rank's `flag` (a caught signal number, 0 for none): all ranks stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def flag_device(world: World) -> torch.device:
    """Where a small flag is best agreed: on the CPU when the group has gloo for CPU tensors (ours does:
    init_process_group), so that asking never waits for the GPU's queue; else on the rank's device."""
    if dist.is_initialized() and "gloo" not in str(dist.get_backend()):
        return world.device
    return torch.device("cpu")


def min_over_ranks(value: int, world: World) -> int:
    """The smallest of every rank's `value` (the value itself on a one-rank world)."""
    if _alone(world):
        return value
    t = torch.tensor([value], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank() -> int:
    """This process's rank in the process group (0 before it is joined, or alone)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave the process group, and wait (on the launcher's store, at most 30 s) until every rank has
    left it too: a rank still tearing down its gloo connections when a peer exits and closes the other
    ends can abort with "terminate called without an active exception" (seen twice in 2-rank tests).
    wait=False: leave at once (a failure not agreed on: a peer may be dead and never leave)."""
    if not dist.is_initialized():
        return
    size = dist.get_world_size()
    store = _store() if size > 1 and wait else None
    dist.destroy_process_group()
    if store is None:
        return
    import time

    try:
        store.add("train/left", 1)
        deadline = time.monotonic() + 30
        while store.add("train/left", 0) < size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, OSError):  # the store went away with a peer (a crash): nothing to wait for
        pass


def _store():
    """The launcher's key-value store (torchrun's / our TCPStore), or None."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _post_error(rank: int, message: str) -> None:
    """Leave this rank's error in the store, where a peer can read it when no collective can carry it."""
    store = _store()
    if store is not None:
        try:
            store.set(f"train/error/rank{rank}", message)
        except (RuntimeError, OSError):
            pass


def _posted_errors(size: int) -> list[str]:
    store, found = _store(), []
    if store is None:
        return found
    for r in range(size):
        key = f"train/error/rank{r}"
        try:
            if store.check([key]):
                found.append(f"rank {r}: {store.get(key).decode()}")
        except (RuntimeError, OSError):  # the store went with a dead rank 0
            break
    return found


def agree(world: World, fn: Callable, what: str):
    """Run `fn` on every rank of `world`; if it failed on any, raise the same UserError on all of them
    (a rank raising alone would leave the others waiting in the next collective). A one-rank world
    agrees with itself without a collective, even inside a larger process group (rank 0's teacher).

    A rank that fails inside a library's own collectives (DeepSpeed's save_checkpoint: a barrier, its
    files, a barrier) leaves the ranks out of step: the agreeing collective then fails too, by
    TRAIN_DIST_TIMEOUT_S at the latest. The error each rank left in the launcher's store then still
    names the failing rank, in one UserError on every rank that is left."""
    error = ""
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported below, on every rank
        result, error = None, f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
    if world.size == 1:
        if error:
            raise UserError(f"{what}: rank 0: {error}")
        return result
    if error:
        _post_error(world.rank, error)
    try:
        failed = any_rank(int(bool(error)), world.device)
        errors = all_gather_object(error) if failed else []
    except RuntimeError as e:  # out of step: a collective that cannot complete
        posted = _posted_errors(world.size) or [f"rank {world.rank}: {error or type(e).__name__ + ': ' + str(e)}"]
        raise UserError(f"{what}: " + "; ".join(posted) + " (the ranks fell out of step in a collective)") from None
    if failed:
        raise UserError(f"{what}: " + "; ".join(f"rank {r}: {m}" for r, m in enumerate(errors) if m))
    return result
