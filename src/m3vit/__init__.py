"""m3vit: multi-task dense prediction with a task-level sparse mixture-of-experts ViT (after M³ViT).

The public names below are imported on first use (PEP 562), so ``import m3vit`` and ``m3vit --help``
stay fast and load PyTorch only when a model, task or tool is actually asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "FlopReport": "m3vit.efficiency.flops", "count_flops": "m3vit.efficiency.flops",
    "TASK_CHANNELS": "m3vit.models.registry", "create_model": "m3vit.models.factory",
    "list_models": "m3vit.models.registry",
    "ConfigError": "m3vit.utils.errors", "M3ViTError": "m3vit.utils.errors",
    "ModelConfig": "m3vit.models.config", "MultiTaskModel": "m3vit.models.m3vit",
    "load_checkpoint": "m3vit.models.checkpoint", "save_checkpoint": "m3vit.models.checkpoint",
    "load_pretrained_vit": "m3vit.models.pretrained",
    "get_task": "m3vit.tasks.registry", "list_tasks": "m3vit.tasks.registry",
}
_SUBPACKAGES = ("nn", "tasks", "models", "data", "engine", "efficiency", "hardware", "analysis", "experiments",
                "serve", "utils")

__all__ = ["nn", "tasks", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"m3vit.{name}")
    else:
        raise AttributeError(f"module 'm3vit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager view of the same names
    from . import nn, tasks
    from .efficiency.flops import FlopReport, count_flops
    from .models import (TASK_CHANNELS, ConfigError, ModelConfig, MultiTaskModel, create_model, list_models,
                         load_checkpoint, load_pretrained_vit, save_checkpoint)
    from .tasks import get_task, list_tasks
    from .utils.errors import M3ViTError
