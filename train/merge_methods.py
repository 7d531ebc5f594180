"""Merging methods: pure functions over the n tensors that share one name (float32 arithmetic).

  linear           weighted average (model soups, LM-Cocktail)
  task_arithmetic  base + scale * sum_i w_i (theta_i - base)            (Ilharco et al., arXiv 2212.04089)
  ties             trim each task vector to its largest `density` fraction, elect a sign per
                   parameter, average the agreeing values                (Yadav et al., arXiv 2306.01708)
  dare_linear /    drop each task-vector entry with probability p, rescale the rest by 1/(1-p),
  dare_ties        then task arithmetic or TIES                            (Yu et al., arXiv 2311.03099)
  slerp            spherical interpolation of two models, per tensor     (Shoemake 1985)
  lora             peft LoRA adapters folded into their base: W + (alpha/r) B A

`make_method` checks a method's settings and returns the `MergeMethod` that merges one tensor name
at a time; the folders, the streaming and the output are in merge_folders.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from train.errors import UserError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "lora")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "lora")


# --- methods: pure functions over the tensors of one name -------------------------------------------


def weighted_average(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i; `tensors` may be a generator (one tensor in memory at a time)."""
    total = float(sum(weights))
    if total == 0:
        raise UserError("merge.weights sum to 0: a weighted average needs a non-zero total")
    out = None
    for t, w in zip(tensors, weights):
        out = t.float() * (w / total) if out is None else out.add_(t.float(), alpha=w / total)
    return out


def task_arithmetic(base: torch.Tensor, taus: Iterable[torch.Tensor], weights: Sequence[float],
                    scale: float = 1.0) -> torch.Tensor:
    """base + scale * sum_i w_i tau_i (taus: task vectors, theta_i - base; may be a generator)."""
    out = torch.zeros_like(base, dtype=torch.float32)
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=w)
    return base.float() + scale * out


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ceil(density * numel) entries of largest magnitude, zero the rest."""
    k = math.ceil(density * tau.numel())
    if k >= tau.numel():
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    flat = tau.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def elect_sign(taus: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES step 2: per entry, the sign of the (weighted) total mass, sign(sum_i w_i tau_i)."""
    total = None
    for tau, w in zip(taus, weights):
        total = tau * w if total is None else total.add_(tau, alpha=w)
    return torch.sign(total)


def disjoint_mean(taus: Iterable[torch.Tensor], weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """TIES step 3: per entry, the weighted mean over the task vectors whose entry is non-zero and
    has the elected sign; entries nobody agrees on stay 0."""
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for tau, w in zip(taus, weights):
        agree = (torch.sign(tau) == sign) & (tau != 0)
        num += torch.where(agree, w * tau, 0.0)
        den += agree.float() * w
    return torch.where(den != 0, num / den.where(den != 0, torch.ones_like(den)), 0.0)


def ties(base: torch.Tensor, taus: Sequence[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
         weights: Sequence[float], density: float | None, scale: float = 1.0) -> torch.Tensor:
    """TIES-merging; density=None skips trimming (DARE has already sparsified the task vectors).
    `taus` may be a function returning a fresh generator: the sign election and the mean then
    make two passes over the task vectors, each holding one at a time."""
    fresh = taus if callable(taus) else (lambda: iter(taus))

    def trimmed() -> Iterator[torch.Tensor]:
        return (trim(t, density) if density is not None else t for t in fresh())

    return base.float() + scale * disjoint_mean(trimmed(), weights, elect_sign(trimmed(), weights))


def dare(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: zero each entry with probability p, multiply the survivors by 1/(1-p) (expectation kept)."""
    if drop_rate == 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) >= drop_rate
    return torch.where(keep, tau / (1 - drop_rate), torch.zeros_like(tau))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between a and b (flattened, angle from their directions); nearly
    parallel tensors (or zeros) fall back to linear interpolation, where slerp's formula divides
    by sin(angle) ~ 0."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return (1 - t) * a32 + t * b32
    cos = torch.clamp((a32.flatten() @ b32.flatten()) / (na * nb), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:
        return (1 - t) * a32 + t * b32
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * a32 + (torch.sin(t * theta) / s) * b32


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """The weight change of a LoRA module: scaling * B @ A  ([out, r] @ [r, in] -> [out, in]),
    transposed for fan_in_fan_out layers (GPT-2 Conv1D) and for embeddings (peft stores them
    as A [r, num_embeddings], B [dim, r])."""
    delta = b.float() @ a.float()
    return scaling * (delta.T if transpose else delta)


def dare_generator(seed: int, model: int, name: str) -> torch.Generator:
    """One generator per (model, tensor): the drop mask does not depend on reading order."""
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class MergeMethod:
    """How to merge: the method and its values, checked and filled in by `make_method`."""

    method: str
    weights: list[float]
    scale: float = 1.0
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0

    def merge(self, name: str, load: Callable[[int], torch.Tensor], n: int,
              base: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor of one name. load(i): model i's tensor, read when asked, so at most
        one input tensor (two for slerp) is held beside the base and the accumulators."""
        m, w = self.method, self.weights
        if m == "linear":
            return weighted_average((load(i) for i in range(n)), w)
        if m == "slerp":
            return slerp(load(0), load(1), w[1] / (w[0] + w[1]))

        def taus() -> Iterator[torch.Tensor]:  # a fresh pass; DARE's masks are seeded per (model, name)
            for i in range(n):
                tau = load(i).float() - base.float()
                yield dare(tau, self.drop_rate, dare_generator(self.seed, i, name)) if m.startswith("dare") else tau

        if m in ("task_arithmetic", "dare_linear"):
            return task_arithmetic(base, taus(), w, self.scale)
        return ties(base, taus, w, self.density if m == "ties" else None, self.scale)


def make_method(method: str, n: int, weights: Sequence[float] | None, has_base: bool, scale: float = 1.0,
                density: float = 0.2, drop_rate: float = 0.9, seed: int = 0) -> MergeMethod:
    if method not in METHODS:
        raise UserError(f"merge.method={method!r}: expected one of {', '.join(METHODS)}")
    if method in NEEDS_BASE and not has_base:
        what = "the adapters' base model" if method == "lora" else "the model the inputs were fine-tuned from"
        raise UserError(f"merge.method={method} needs merge.base: {what}")
    if n < (1 if method == "lora" else 2):
        raise UserError(f"merge.models has {n} model(s); merge.method={method} needs at least "
                        f"{1 if method == 'lora' else 2}")
    if method == "slerp" and n != 2:
        raise UserError(f"merge.method=slerp interpolates two models; merge.models has {n}")
    if weights is None:
        weights = [1.0] * n if method == "lora" else [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"merge.weights has {len(weights)} values for {n} merge.models; expected one per model")
    if method in ("linear", "slerp") and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise UserError(f"merge.weights={weights}: merge.method={method} needs non-negative weights "
                        "with a positive sum")
    if not 0 < density <= 1:
        raise UserError(f"merge.density={density}: expected a fraction in (0, 1]")
    if not 0 <= drop_rate < 1:
        raise UserError(f"merge.drop_rate={drop_rate}: expected a probability in [0, 1)")
    return MergeMethod(method, weights, scale, density, drop_rate, seed)
