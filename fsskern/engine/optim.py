"""Optimizers and the warm-up + poly (or step) schedule.

A model may define ``param_groups(train_cfg) -> [{"params": [...], "lr_mult": 10.0,
"optimizer": "adamw", "lr": ..., "weight_decay": ..., "schedule": "constant"}, ...]``; groups are
split by their ``optimizer`` (default ``train.optimizer``) into one optimizer each, so a recipe such as
UMTFSS's (SGD for the convolutions, AdamW for the Transformer) is one model method, and every optimizer
is in the checkpoint (CyCTR-style code forgets the second one). A group's ``schedule`` is ``poly`` (the
default: warm-up, then poly decay, or steps of ``lr_gamma`` at ``train.lr_steps`` where set: PANet's
MultiStepLR) or ``constant`` (its LR throughout, as UMTFSS's code keeps AdamW's).
"""
import torch

from .config import TrainConfig


def _groups(model, cfg: TrainConfig):
    if hasattr(model, "param_groups"):
        groups = model.param_groups(cfg)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # a group's params may be any iterable (a module's .parameters() generator too): listed once, then filtered
    groups = [dict(g, params=list(g["params"])) for g in groups]
    return [g for g in groups if g["params"]]


def build_optimizers(model, cfg: TrainConfig):
    by_name = {}
    for group in _groups(model, cfg):
        name = group.pop("optimizer", cfg.optimizer)
        group["lr"] = group.get("lr", cfg.lr) * group.pop("lr_mult", 1.0)
        group["initial_lr"] = group["lr"]
        by_name.setdefault(name, []).append(group)
    optimizers = []
    for name, groups in sorted(by_name.items()):
        if name == "sgd":
            optimizers.append(torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        elif name == "adamw":
            optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))
        else:
            raise ValueError(f"unknown optimizer {name!r} in a parameter group; use sgd or adamw")
    return optimizers


def lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_iters`` steps, then PFENet's poly decay (1 - t / T) ** power, or with
    ``lr_steps`` PANet's MultiStepLR: x ``lr_gamma`` from each listed step on."""
    if iteration < cfg.warmup_iters:
        return (iteration + 1) / cfg.warmup_iters
    if cfg.lr_steps:
        return cfg.lr_gamma ** sum(iteration >= step for step in cfg.lr_steps)
    return max(0.0, 1.0 - iteration / max(1, cfg.iters)) ** cfg.poly_power


SCHEDULES = ("poly", "constant")


def build_schedulers(optimizers, cfg: TrainConfig):
    """One LambdaLR per optimizer, with one factor per parameter group (its ``schedule``)."""
    def factor(group):
        schedule = group.get("schedule", "poly")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} in a parameter group; use one of {SCHEDULES}")
        return (lambda it: 1.0) if schedule == "constant" else (lambda it: lr_factor(it, cfg))
    return [torch.optim.lr_scheduler.LambdaLR(o, [factor(g) for g in o.param_groups]) for o in optimizers]
