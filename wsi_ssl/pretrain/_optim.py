"""Optimiser and learning-rate schedule shared by tile SSL and slide SSL (one home each)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["build_optimizer", "warmup_cosine", "warmup_cosine_factor"]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    optimizer: Literal["adamw", "adam"] = "adamw") -> torch.optim.Optimizer:
    """Adam/AdamW with ``weight_decay`` on the weight matrices and none on biases/norms.

    (The reference Giga-SSL code builds its optimiser without the weight decay of its config; here
    it reaches the optimiser: ``param_groups[0]["weight_decay"] == weight_decay``.)
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of the base lr at optimisation ``step`` (0-based): linear warm-up
    ``(step + 1) / warmup_steps`` then half a cosine from 1 to 0 over the remaining steps
    (0 after ``total_steps``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(opt: torch.optim.Optimizer, *, base_lr: float, total_steps: int,
                  warmup_steps: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Torch's ``LambdaLR`` with :func:`warmup_cosine_factor` around ``base_lr``; call ``step()``
    after every optimiser step. ``start_step`` resumes the schedule (the lr of that step is set
    now, whatever a restored optimiser state held).

    Why ``LambdaLR`` and not ``SequentialLR(LinearLR, CosineAnnealingLR)``: the chained torch
    schedulers update the lr recursively (``lr *= ratio`` every step), which drifts from the closed
    form by float rounding, and ``CosineAnnealingLR`` restarts after ``T_max`` instead of holding
    0. ``LambdaLR`` sets ``base_lr * factor(step)`` exactly, so a resumed run and a straight run
    see bit-identical learning rates.
    """
    for g in opt.param_groups:
        g["initial_lr"] = float(base_lr)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine_factor(s, total_steps, warmup_steps),
        last_epoch=start_step - 1)
