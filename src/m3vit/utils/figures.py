"""The one home of m3vit's figure plumbing: a headless matplotlib figure, a picture grid, and atomic PNG saving.

matplotlib is imported inside the functions that draw, never at module import (``import m3vit`` stays
light); nothing here imports torch: images come in as tensors and are converted with their own methods.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .io import write_atomic

__all__ = ["new_figure", "save_figure", "check_figure_path", "is_m3vit_figure", "image_to_uint8", "picture_grid", "FIGURE_TAG"]

#: The PNG text entry every figure m3vit saves carries, by which ``is_m3vit_figure`` recognises its own files.
FIGURE_TAG = ("Software", "m3vit")


def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on the headless Agg backend (no window)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def check_figure_path(path: str | os.PathLike) -> None:
    """Refuse (``InputError``) a figure path whose name does not end in ``.png``: m3vit writes PNG only, and a
    ``samples.jpg`` holding PNG bytes would mislead every program that trusts the suffix."""
    if Path(path).suffix.lower() != ".png":
        raise InputError(f"{path}: m3vit writes figures as PNG; give a file name ending in .png")


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Write a matplotlib ``Figure`` as PNG (tagged ``FIGURE_TAG``; ``dpi`` default: the figure's) to a
    temporary name, then rename it to ``path`` (``check_figure_path``); the path."""
    check_figure_path(path)
    key, value = FIGURE_TAG
    return os.fspath(write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi or "figure",
                                                                metadata={key: value})))


def is_m3vit_figure(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that ``save_figure`` wrote (its ``FIGURE_TAG`` text entry)."""
    from PIL import Image, UnidentifiedImageError

    key, value = FIGURE_TAG
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and getattr(image, "text", {}).get(key) == value
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def image_to_uint8(image):
    """An image tensor ``[3, H, W]`` in ``[0, 1]`` as an RGB ``uint8 [H, W, 3]`` array (clipped, rounded)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def picture_grid(rows: Sequence[Sequence], column_titles: Sequence[str], path: str | os.PathLike, *,
                 cell: float = 1.6, dpi: int = 100, title: str | None = None) -> str:
    """Write a PNG grid of RGB pictures (``rows[r][c]``: ``uint8 [H, W, 3]``), without axes, each column
    titled on the first row and the whole grid under ``title`` when given; return the path.

    Every cell is ``cell`` inches square; 0.3 inch on top holds the column titles (0.5 with ``title``).
    """
    if not rows:
        raise ValueError("picture_grid needs at least one row")
    top_margin = 0.3 if title is None else 0.5
    height = cell * len(rows) + 0.3
    fig = new_figure(cell * len(column_titles), height, dpi)
    axes = fig.subplots(len(rows), len(column_titles), squeeze=False)
    for r, pictures in enumerate(rows):
        for c, picture in enumerate(pictures):
            ax = axes[r][c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - top_margin / height, wspace=0.04, hspace=0.04)
    return save_figure(fig, path)
