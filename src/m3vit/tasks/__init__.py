"""The six dense-prediction tasks: ``get_task(name, **opts)`` gives a task's loss, metric, colouring and label hooks."""

from __future__ import annotations

from .base import IGNORE, Metric, Task
from .delta import delta_m, load_baselines, reference_baselines_path, reference_delta_m
from .depth import Depth
from .edge import Edge
from .human_parts import HumanParts
from .normals import Normals
from .registry import default_loss_weights, get_task, list_tasks
from .sal import Saliency
from .semseg import SemSeg

__all__ = [
    "IGNORE", "Task", "Metric", "get_task", "list_tasks", "default_loss_weights", "delta_m", "load_baselines",
    "reference_baselines_path", "reference_delta_m",
    "SemSeg", "HumanParts", "Saliency", "Normals", "Edge", "Depth",
]
