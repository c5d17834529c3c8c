"""NYUD-v2 in the multi-task layout of the field (the ``NYUD_MT`` tree): semseg, depth, normals, edges.

Expected tree (the multi-task learning reference code's archive; ``.png`` alternatives accepted)::

    NYUD_MT/
      images/<id>.jpg (or .png)
      gt_sets/{train,val}.txt        one image id per line (795 train / 654 val)
      segmentation/<id>.png          40 classes as 1..40, 0 unlabelled
      depth/<id>.npy                 float [H, W] metres, 0 where unknown
      normals/<id>.npy (or .png)     float [H, W, 3] in [-1, 1] (PNG: n = 2 * v / 255 - 1)
      edge/<id>.npy (or .png)        0 / 1 (PNG: > 0 is an edge)

Only the folders of the requested tasks are needed. Labels in memory (``m3vit.tasks.base``):

- ``semseg``: stored value ``v`` -> class ``v - 1`` (0..39, ``classes`` in that order); 0 -> 255.
- ``depth``: metres; 0 and non-finite values -> 255.
- ``normals``: renormalised to unit length; all-zero (or non-finite) vectors and, for PNGs, black
  (0, 0, 0) pixels -> 255 in all three channels. The stored axes are used as they are, taken to be
  x right, y up, z towards the camera; the archive does not document its convention, so check one
  image (a floor should point along +y) before training with rotations.
- ``edge``: 0 / 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..tasks import task_class
from ..tasks.base import IGNORE
from ..utils.errors import DataError
from ._io import FolderDataset, label_file, mask_invalid, read_png, unit_vectors

__all__ = ["NYUDMT", "NYUD_CLASSES"]

#: The 40 NYUv2 classes (Gupta et al. 2013), class id = stored value - 1.
NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

_TREE = """\
NYUD_MT/
  images/<id>.jpg (or .png)
  gt_sets/{train,val}.txt        one image id per line
  segmentation/<id>.png          40 classes as 1..40, 0 unlabelled
  depth/<id>.npy                 metres, 0 unknown
  normals/<id>.npy (or .png)     [H, W, 3] in [-1, 1] (PNG: 2*v/255 - 1)
  edge/<id>.npy (or .png)        0 / 1"""


def _load_array(path: str) -> np.ndarray:
    if not path.endswith(".npy"):
        return read_png(path)
    with label_file(path):
        return np.load(path, allow_pickle=False)


class NYUDMT(FolderDataset):
    """NYUD-v2 multi-task dataset: ``semseg``, ``depth``, ``normals``, ``edge``.

    Samples: ``image float32 [3, H, W]`` in [0, 1], one label per task in the ``m3vit.tasks.base``
    format, ``meta = {"dataset", "split", "index", "id", "size": (H, W)}``. ``transform(sample, rng)``
    is applied last with ``rng = self.rng(index)`` (depends on seed, split, index and ``set_epoch``).
    See the module docstring for the tree and how files become labels.
    """

    dataset_name = "nyud"
    tree_name = "NYUD_MT"
    tree = _TREE
    splits = ("train", "val")
    split_pattern = "gt_sets/{split}.txt"
    file_patterns = {
        "image": ("images/{id}.jpg", "images/{id}.png"),
        "semseg": ("segmentation/{id}.png",),
        "depth": ("depth/{id}.npy",),
        "normals": ("normals/{id}.npy", "normals/{id}.png"),
        "edge": ("edge/{id}.npy", "edge/{id}.png"),
    }
    all_tasks = ("semseg", "depth", "normals", "edge")
    channels = {**{t: task_class(t).default_channels for t in all_tasks}, "semseg": len(NYUD_CLASSES)}
    classes = NYUD_CLASSES
    #: Per-task loss weights of the reference recipe (M³ViT / ATRC code base; normals and edge: 4-task NYUD).
    REFERENCE_LOSS_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    #: The official M³ViT's NYUD augmentation (``data.scale_rotate: reference``): a scale drawn from
    #: {1.0, 1.2, 1.5}, never rotated, depth divided by the scale (docs/reference.md).
    REFERENCE_SCALE_ROTATE = {"scale_choices": (1.0, 1.2, 1.5), "degrees": (0.0, 0.0)}

    def __init__(self, root: str | os.PathLike, split: str = "train", tasks: Sequence[str] | None = None,
                 transform: Callable | None = None, seed: int = 0) -> None:
        self._setup(root, split, tasks, transform, seed, {})

    def _load_label(self, task: str, index: int, size: tuple[int, int]) -> torch.Tensor:
        path = self._paths[task][index]
        values = _load_array(path)
        if task == "semseg":
            values = _two_dimensional(values, path).astype(np.int64)
            bad = (values < 0) | (values > len(NYUD_CLASSES))
            if bad.any():
                raise DataError(f"{path}: label value {int(values[bad][0])} is outside 0..{len(NYUD_CLASSES)}")
            return torch.from_numpy(np.where(values == 0, IGNORE, values - 1))
        if task == "depth":
            depth = _two_dimensional(values, path).astype(np.float32)
            invalid = ~np.isfinite(depth) | (depth == 0)
            if (depth[~invalid] < 0).any():
                raise DataError(f"{path}: negative depth values (metres expected, 0 for unknown)")
            return torch.from_numpy(mask_invalid(depth, invalid))[None]
        if task == "edge":
            edges = _two_dimensional(values, path)
            return torch.from_numpy((edges > 0).astype(np.float32))[None]
        if task == "normals":
            return torch.from_numpy(_decode_normals(values, path))
        raise KeyError(task)


def _two_dimensional(values: np.ndarray, path: str) -> np.ndarray:
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise DataError(f"{path}: expected a single-channel [H, W] map, got shape {values.shape}")
    return values


def _decode_normals(values: np.ndarray, path: str) -> np.ndarray:
    if values.ndim != 3 or values.shape[-1] != 3:
        raise DataError(f"{path}: normals must be [H, W, 3], got shape {values.shape}")
    if path.endswith(".png"):
        black = (values[..., 0] == 0) & (values[..., 1] == 0) & (values[..., 2] == 0)
        return unit_vectors(values * (2.0 / 255.0) - 1.0, black)
    return unit_vectors(values, np.zeros(values.shape[:2], dtype=bool))
