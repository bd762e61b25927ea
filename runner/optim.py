"""Optimizers and per-step learning-rate schedules, built from the `optimizer` and `scheduler` groups."""

import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """cfg: the `optimizer` node."""
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer.name={cfg.name!r} is not known; choose one of ['adam', 'adamw', 'sgd']")


def lr_factor(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at a global step; schedules are per step so resume is exact mid-epoch."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    if cfg.name == "onecycle":  # triangular, fast AT's 0 -> max -> 0
        peak = cfg.pct_start
        return progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak))
    raise ValueError(
        f"scheduler.name={cfg.name!r} is not known; choose one of ['constant', 'cosine', 'multistep', 'onecycle']"
    )


def build_scheduler(cfg, optimizer, steps_per_epoch: int, total_steps: int):
    # The schedule reads its settings at every step: from plain Python values, not the config's nodes
    # (the same numbers; an OmegaConf lookup costs microseconds each).
    plain = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    lr_factor(plain, 0, total_steps, steps_per_epoch)  # fail on a bad name now, not at the first step
    schedule = lambda step: lr_factor(plain, step, total_steps, steps_per_epoch)  # noqa: E731
    cycle = getattr(plain, "cycle_momentum", None)
    if cycle is not None:
        return MomentumCycle(optimizer, schedule, cycle)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class MomentumCycle(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that also sets SGD's momentum against the lr: high - (high - low) * lr / peak lr, as
    torch's CyclicLR does with cycle_momentum. The momentum follows the step count alone, so a resumed
    run (scheduler state restored) gets the same values."""

    def __init__(self, optimizer, lr_lambda, momentum_range):
        self.momentum_range = tuple(float(m) for m in momentum_range)
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch=None):
        super().step() if epoch is None else super().step(epoch)
        low, high = self.momentum_range
        for group, peak in zip(self.optimizer.param_groups, self.base_lrs):
            group["momentum"] = high - (high - low) * (group["lr"] / peak if peak else 0.0)
