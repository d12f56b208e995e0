"""Optimizer and learning-rate schedule of a training run (and the schedule after a resume)."""

from __future__ import annotations

import math
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig


def make_scheduler(optimizer: Any, cfg: TrainConfig, total: int):
    import torch

    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if warmup and step < warmup and kind != "constant":
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: Any, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("nothing to train: the selection leaves no trainable parameter")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def resync_learning_rate(optimizer: Any, scheduler: Any, learning_rate: float) -> None:
    """Put the schedule of THIS run at the loaded checkpoint's step (a resume may change the learning
    rate or the number of steps; unchanged settings give back exactly the saved values)."""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = learning_rate
    scheduler._last_lr = lrs
