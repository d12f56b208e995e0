"""Optimizer and learning-rate schedule of a training run (and the schedule after a resume)."""

from __future__ import annotations

import math
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))


def make_scheduler(optimizer: Any, cfg: TrainConfig, total: int):
    """transformers' own schedule of that name (what users know from the HF Trainer), stepped once per
    optimizer step; `--lr-scheduler-kwargs` are its extra arguments."""
    from transformers import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total),
                             num_training_steps=total, scheduler_specific_kwargs=dict(cfg.lr_scheduler_kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--lr-scheduler-type {cfg.lr_scheduler_type} with --lr-scheduler-kwargs "
                          f"{cfg.lr_scheduler_kwargs or {}}: {e}") from None


def check_scheduler(cfg: TrainConfig, total: int) -> None:
    """Build the schedule over a throwaway parameter: bad --lr-scheduler-kwargs fail before any weight."""
    import torch

    make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate or 1.0), cfg,
                   max(total, 1))


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
