"""m3vit: multi-task dense prediction with a task-level sparse mixture-of-experts ViT (after M³ViT)."""

from . import nn, tasks
from .efficiency import FlopReport, count_flops
from .models import (
    TASK_CHANNELS,
    ConfigError,
    ModelConfig,
    MultiTaskModel,
    create_model,
    list_models,
    load_checkpoint,
    load_pretrained_vit,
    save_checkpoint,
)

from .tasks import get_task, list_tasks

__version__ = "0.1.0"

__all__ = [
    "nn", "tasks", "get_task", "list_tasks", "FlopReport", "count_flops", "TASK_CHANNELS", "ConfigError", "ModelConfig", "MultiTaskModel",
    "create_model", "list_models", "load_checkpoint", "load_pretrained_vit", "save_checkpoint",
]
