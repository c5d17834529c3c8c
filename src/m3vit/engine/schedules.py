"""Optimizers and learning-rate schedules of a run: parameter groups, SGD/AdamW, poly/cosine/constant.

The learning rate of optimizer step ``s`` (0-based) out of ``total`` with ``w`` warmup steps is

- warmup, ``s < w``: ``lr * (s + 1) / w`` (linear from ``lr / w`` up to ``lr``);
- after it, with progress ``p = (s - w) / max(1, total - w)`` (in ``[0, 1)`` within the run, held at
  1 past its end):
  ``poly``: ``min_lr + (lr - min_lr) * (1 - p) ** power`` (the reference recipe, power 0.9);
  ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``; ``constant``: ``lr``.

The schedule is a pure function of the step; ``StepScheduler`` applies it to an optimizer and keeps
only the step as state, so a resumed run may change ``train.steps`` and the remaining schedule follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.config import ConfigError

__all__ = ["LRSchedule", "StepScheduler", "param_groups", "build_optimizer", "NO_DECAY_NAMES"]

# Parameters that get no weight decay besides every 1-d parameter (norm scales and shifts, biases):
# the ViT's position embedding and class token (standard ViT practice) and the experts' stacked
# biases ``b1 [E, hidden]``/``b2 [E, dim]`` (2-d only because the experts are stacked).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "b1", "b2")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the 0-based optimizer step (see the module docstring)."""

    lr: float
    total_steps: int
    kind: str = "poly"
    warmup_steps: int = 0
    power: float = 0.9
    min_lr: float = 0.0

    def __post_init__(self) -> None:
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
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "poly":
            shape = (1.0 - progress) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * shape

    @classmethod
    def from_config(cls, train_cfg: Any, total_steps: int) -> "LRSchedule":
        return cls(lr=train_cfg.lr, total_steps=total_steps, kind=train_cfg.schedule,
                   warmup_steps=train_cfg.warmup_steps, power=train_cfg.poly_power, min_lr=train_cfg.min_lr)


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


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(modules: dict[str, nn.Module] | nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: weights with ``weight_decay``, and norms, biases, ``pos_embed``,
    ``cls_token`` and expert biases without it (``NO_DECAY_NAMES``). Frozen parameters are left out.

    ``modules`` is one module or ``{prefix: module}`` (e.g. the model and an auxiliary head); each
    group's ``names`` lists the dotted parameter names it holds.
    """
    if isinstance(modules, nn.Module):
        modules = {"": modules}
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            group = decay if _decays(name, param) else no_decay
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}" if prefix else name)
    return [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]


def build_optimizer(train_cfg: Any, modules: dict[str, nn.Module] | nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW (betas) of ``train_cfg`` over ``param_groups(modules)``."""
    groups = [g for g in param_groups(modules, train_cfg.weight_decay) if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))
    raise ConfigError(f"train.optimizer: {train_cfg.optimizer!r} is not allowed; choose one of ['sgd', 'adamw']")
