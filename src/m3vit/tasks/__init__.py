"""The six dense-prediction tasks: ``get_task(name, **opts)`` gives a task's loss, metric, colouring, decoding,
label hooks, title, default channels and headline metrics: everything m3vit knows about a task lives here."""

from __future__ import annotations

from .base import IGNORE, Metric, Task
from .delta import delta_m, load_baselines, reference_baselines_path, reference_delta_m
from .depth import Depth
from .edge import Edge
from .human_parts import HumanParts
from .normals import Normals
from .registry import TASK_CLASSES, default_task_channels, get_task, list_tasks, task_class, task_title
from .sal import Saliency
from .semseg import SemSeg

__all__ = [
    "IGNORE", "Task", "Metric", "TASK_CLASSES", "get_task", "list_tasks", "task_class", "task_title",
    "default_task_channels", "delta_m", "load_baselines",
    "reference_baselines_path", "reference_delta_m",
    "SemSeg", "HumanParts", "Saliency", "Normals", "Edge", "Depth",
]
