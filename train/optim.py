"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.errors import UserError

SCHEDULES = ("linear", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and normalisation weights are left alone
    (as BERT's original recipe and most since)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float,
             kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak learning rate, then linear or cosine decay to 0, or constant."""
    if kind not in SCHEDULES:
        raise UserError(f"trainer.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_ratio <= 1:
        raise UserError(f"trainer.warmup_ratio={warmup_ratio}: expected a share of the steps, from 0 to 1")
    warmup = round(warmup_ratio * max_steps)

    def factor(step: int) -> float:  # `step` optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, max_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
