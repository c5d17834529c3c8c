"""Picture a dataset: a PNG grid with one row per sample, the image and every label coloured by its task."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..tasks import get_task
from ..utils.errors import InputError
from ..utils.figures import check_figure_path, image_to_uint8, is_m3vit_figure, picture_grid
from ..utils.io import check_file_replaceable

__all__ = ["dataset_tasks", "render_grid"]


def dataset_tasks(dataset=None, task_channels: dict[str, int] | None = None) -> dict:
    """``{task name: Task}`` for ``task_channels`` (default: the dataset's), sized to those channels.

    Class names come from ``dataset`` (``classes`` for the task with ``num_classes`` equal to them, else
    ``part_names``) when it has them and their number matches the channels.
    """
    if task_channels is None:
        task_channels = dataset.task_channels
    tasks = {}
    for name, channels in task_channels.items():
        task = get_task(name)
        if task.label_kind != "class":
            tasks[name] = task
            continue
        names = getattr(dataset, task.class_names_attribute, None)
        known = names is not None and len(names) == channels
        tasks[name] = get_task(name, num_classes=channels, class_names=list(names) if known else None)
    return tasks


def render_grid(dataset, indices: Sequence[int], path: str | os.PathLike, *, cell: float = 1.6,
                dpi: int = 100) -> str:
    """Write a PNG grid of ``dataset[i]`` for ``i in indices`` (image + every label); return the path.

    Samples must be un-normalised (``image`` in [0, 1]): pass the dataset without ``Normalize``.
    The file is written to a temporary name and renamed, so a failure leaves nothing behind; an existing
    ``path`` is replaced only when it is a figure m3vit wrote (``OutputError`` otherwise, before any work).
    """
    if not indices:
        raise InputError("render_grid needs at least one sample index")
    check_figure_path(path)
    check_file_replaceable(path, is_m3vit_figure, "a PNG figure")
    tasks = dataset_tasks(dataset)
    rows = []
    for index in indices:
        sample = dataset[index]
        rows.append([image_to_uint8(sample["image"]), *(task.colorize(sample[key]) for key, task in tasks.items())])
    titles = ["image", *(task.title for task in tasks.values())]
    return picture_grid(rows, titles, path, cell=cell, dpi=dpi)
