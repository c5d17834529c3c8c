"""Task lookup by name and the reference loss weights per dataset."""

from __future__ import annotations

from ..utils.errors import ConfigError
from .base import Task
from .depth import Depth
from .edge import Edge
from .human_parts import HumanParts
from .normals import Normals
from .sal import Saliency
from .semseg import SemSeg

__all__ = ["get_task", "list_tasks", "task_class", "default_loss_weights"]

_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SemSeg, HumanParts, Saliency, Normals, Edge, Depth)}

# Loss weights of the reference recipe (M³ViT / ATRC code base).
_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "pascal_context": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0},
    "nyud": {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0},
    "synthetic": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0, "depth": 1.0},
}


def list_tasks() -> list[str]:
    """Names accepted by ``get_task``."""
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    """The class of task ``name`` (its ``higher_is_better``, ``primary_metric`` ...)."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks are {list_tasks()}")
    return _TASKS[name]


def get_task(name: str, **opts) -> Task:
    """A configured task, e.g. ``get_task("semseg", num_classes=40)``; see each task class for its options.

    An unknown option raises ``TypeError`` naming it; a bad value raises ``ConfigError`` (a ``ValueError``).
    """
    return task_class(name)(**opts)


def default_loss_weights(dataset: str) -> dict[str, float]:
    """Per-task loss weights of the reference recipe for ``dataset`` (a fresh dict)."""
    if dataset not in _LOSS_WEIGHTS:
        raise ConfigError(f"no default loss weights for dataset {dataset!r}; known datasets are {sorted(_LOSS_WEIGHTS)}")
    return dict(_LOSS_WEIGHTS[dataset])
