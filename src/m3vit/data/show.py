"""Picture a dataset: a PNG grid with one row per sample, the image and every label coloured by its task."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..tasks import get_task
from ..utils.errors import InputError

__all__ = ["dataset_tasks", "render_grid", "save_figure"]

_TITLES = {
    "image": "image", "semseg": "semseg", "human_parts": "human parts", "sal": "saliency",
    "normals": "normals", "edge": "edges", "depth": "depth",
}


def dataset_tasks(dataset=None, task_channels: dict[str, int] | None = None) -> dict:
    """``{task name: Task}`` for ``task_channels`` (default: the dataset's), sized to those channels.

    Class names come from ``dataset`` (``classes`` / ``part_names``) when it has them and their number
    matches the channels.
    """
    if task_channels is None:
        task_channels = dataset.task_channels
    names = {"semseg": getattr(dataset, "classes", None), "human_parts": getattr(dataset, "part_names", None)}
    tasks = {}
    for name, channels in task_channels.items():
        if name in names:
            known = names[name] if names[name] is not None and len(names[name]) == channels else None
            tasks[name] = get_task(name, num_classes=channels, class_names=None if known is None else list(known))
        else:
            tasks[name] = get_task(name)
    return tasks


def _image_to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def render_grid(dataset, indices: Sequence[int], path: str | os.PathLike, *, cell: float = 1.6,
                dpi: int = 100) -> str:
    """Write a PNG grid of ``dataset[i]`` for ``i in indices`` (image + every label); return the path.

    Samples must be un-normalised (``image`` in [0, 1]): pass the dataset without ``Normalize``.
    The file is written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not indices:
        raise InputError("render_grid needs at least one sample index")
    tasks = dataset_tasks(dataset)
    columns = ["image", *tasks]
    fig = Figure(figsize=(cell * len(columns), cell * len(indices) + 0.3), dpi=dpi)
    axes = fig.subplots(len(indices), len(columns), squeeze=False)
    for row, index in enumerate(indices):
        sample = dataset[index]
        for col, key in enumerate(columns):
            ax = axes[row][col]
            picture = _image_to_uint8(sample["image"]) if key == "image" else tasks[key].colorize(sample[key])
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_TITLES.get(key, key), fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (cell * len(indices) + 0.3),
                        wspace=0.04, hspace=0.04)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> str:
    """Write a matplotlib ``Figure`` as PNG to a temporary name, then rename it to ``path``."""
    from ..utils.io import write_atomic

    return os.fspath(write_atomic(path, lambda tmp: fig.savefig(tmp, format="png")))
