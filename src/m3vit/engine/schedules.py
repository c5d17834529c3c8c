"""Optimizers and learning-rate schedules of a run: parameter groups, SGD/AdamW, poly/cosine/constant.

The learning rate of optimizer step ``s`` (0-based) out of ``total`` with ``w`` warmup steps is

- warmup, ``s < w``: ``lr * (s + 1) / w`` (linear from ``lr / w`` up to ``lr``);
- after it, with progress ``p = (s - w) / max(1, total - w)`` (in ``[0, 1)`` within the run, held at
  1 past its end):
  ``poly``: ``min_lr + (lr - min_lr) * (1 - p) ** power`` (the reference recipe, power 0.9);
  ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``; ``constant``: ``lr``.

With ``update="epoch"`` (``train.lr_update``; the official M³ViT sets the poly lr once per epoch)
the lr of every step of an epoch is the value of that epoch's first step ``s_e = (s // n) · n``
(``n`` steps per epoch; warmup steps stay per step): ``lr · (1 − e / E) ** power`` in epoch ``e`` of a
run of ``E`` whole epochs.

The schedule is a pure function of the step; ``StepScheduler`` applies it to an optimizer and keeps
only the step as state, so a resumed run may change ``train.steps`` and the remaining schedule follows.

Weight decay (``param_groups``, ``train.weight_decay_exclude``): ``"norms_biases_embeddings"`` exempts
every 1-d parameter (norm scales and shifts, biases) and ``NO_DECAY_NAMES``; ``"none"`` decays every
parameter, as the official code's single SGD group does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.config import ConfigError

__all__ = ["LRSchedule", "StepScheduler", "param_groups", "build_optimizer", "NO_DECAY_NAMES", "LR_UPDATES",
           "WEIGHT_DECAY_EXCLUDES"]

# Parameters that get no weight decay besides every 1-d parameter (norm scales and shifts, biases):
# the ViT's position embedding and class token (standard ViT practice) and the experts' stacked
# biases ``b1 [E, hidden]``/``b2 [E, dim]`` (2-d only because the experts are stacked).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "b1", "b2")
#: When the learning rate changes (``train.lr_update``).
LR_UPDATES = ("step", "epoch")
#: Which parameters get no weight decay (``train.weight_decay_exclude``).
WEIGHT_DECAY_EXCLUDES = ("norms_biases_embeddings", "none")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the 0-based optimizer step (see the module docstring)."""

    lr: float
    total_steps: int
    kind: str = "poly"
    warmup_steps: int = 0
    power: float = 0.9
    min_lr: float = 0.0
    update: str = "step"
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.update not in LR_UPDATES:
            raise ConfigError(f"train.lr_update: {self.update!r} is not allowed; choose one of {list(LR_UPDATES)}")
        if self.update == "epoch" and (self.steps_per_epoch is None or self.steps_per_epoch < 1):
            raise ConfigError(f"train.lr_update: 'epoch' needs the steps per epoch (>= 1), "
                              f"got {self.steps_per_epoch!r}")
        if self.kind not in ("poly", "cosine", "constant"):
            raise ConfigError(f"train.schedule: {self.kind!r} is not allowed; choose one of ['poly', 'cosine', 'constant']")
        if self.total_steps < 1:
            raise ConfigError(f"train.steps: the schedule needs >= 1 step, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.update == "epoch":
            step = max(self.warmup_steps, (step // self.steps_per_epoch) * self.steps_per_epoch)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "poly":
            shape = (1.0 - progress) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * shape

    @classmethod
    def from_config(cls, train_cfg: Any, total_steps: int, steps_per_epoch: int | None = None) -> "LRSchedule":
        return cls(lr=train_cfg.lr, total_steps=total_steps, kind=train_cfg.schedule,
                   warmup_steps=train_cfg.warmup_steps, power=train_cfg.poly_power, min_lr=train_cfg.min_lr,
                   update=getattr(train_cfg, "lr_update", "step"), steps_per_epoch=steps_per_epoch)


class StepScheduler:
    """Sets every parameter group's ``lr`` to ``schedule(step)`` before each optimizer step.

    Call ``apply()`` before ``optimizer.step()`` and ``step()`` after it; the state is the step count.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, step: int = 0):
        self.optimizer, self.schedule, self.last_step = optimizer, schedule, step

    def apply(self) -> float:
        lr = self.schedule(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        self.last_step += 1

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.last_step = int(state["step"])


def _decays(name: str, param: torch.Tensor, exclude: str) -> bool:
    if exclude == "none":
        return True
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(modules: dict[str, nn.Module] | nn.Module, weight_decay: float,
                 exclude: str = "norms_biases_embeddings") -> list[dict[str, Any]]:
    """Two optimizer groups: weights with ``weight_decay``, and norms, biases, ``pos_embed``,
    ``cls_token`` and expert biases without it (``NO_DECAY_NAMES``); with ``exclude="none"`` every
    parameter is in the first group and the second is empty. Frozen parameters are left out.

    ``modules`` is one module or ``{prefix: module}`` (e.g. the model and an auxiliary head); each
    group's ``names`` lists the dotted parameter names it holds.
    """
    if exclude not in WEIGHT_DECAY_EXCLUDES:
        raise ConfigError(f"train.weight_decay_exclude: {exclude!r} is not allowed; "
                          f"choose one of {list(WEIGHT_DECAY_EXCLUDES)}")
    if isinstance(modules, nn.Module):
        modules = {"": modules}
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            group = decay if _decays(name, param, exclude) else no_decay
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}" if prefix else name)
    return [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]


def build_optimizer(train_cfg: Any, modules: dict[str, nn.Module] | nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW (betas) of ``train_cfg`` over ``param_groups(modules)``."""
    exclude = getattr(train_cfg, "weight_decay_exclude", "norms_biases_embeddings")
    groups = [g for g in param_groups(modules, train_cfg.weight_decay, exclude) if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))
    raise ConfigError(f"train.optimizer: {train_cfg.optimizer!r} is not allowed; choose one of ['sgd', 'adamw']")
