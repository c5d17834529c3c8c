"""Task lookup by name: the task classes, in their canonical order, and what each declares about itself."""

from __future__ import annotations

from ..utils.errors import ConfigError
from .base import Task
from .depth import Depth
from .edge import Edge
from .human_parts import HumanParts
from .normals import Normals
from .sal import Saliency
from .semseg import SemSeg

__all__ = ["TASK_CLASSES", "get_task", "list_tasks", "task_class", "task_title", "default_task_channels"]

#: Every known task class, in the canonical order (PASCAL-Context's five, then depth).
TASK_CLASSES: tuple[type[Task], ...] = (SemSeg, HumanParts, Saliency, Normals, Edge, Depth)

_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in TASK_CLASSES}


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


def task_title(name: str) -> str:
    """The figure / table title of task ``name`` ("human parts"); an unknown name is its own title."""
    return _TASKS[name].title if name in _TASKS else name


def default_task_channels() -> dict[str, int]:
    """``{task name: default output channels}`` of every known task, in the canonical order (a fresh dict)."""
    return {cls.name: cls.default_channels for cls in TASK_CLASSES}
