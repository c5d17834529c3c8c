"""PASCAL-Context in the multi-task layout of the field (the ``PASCAL_MT`` tree): five dense tasks per image.

Expected tree (the archive of the multi-task learning reference code, unchanged)::

    PASCAL_MT/
      JPEGImages/<id>.jpg
      ImageSets/Context/{train,val}.txt     one image id per line (4998 train / 5105 val)
      semseg/pascal-context/<id>.png        21 classes: 0 background + the 20 VOC classes; 255 ignored
                                            (semseg/VOC12/<id>.png is read instead where it exists,
                                            as the reference does)
      pascal-context/trainval/<id>.mat      'LabelMap': the full 459-class PASCAL-Context labels
                                            (edges; the normals mask)
      human_parts/<id>.mat                  PASCAL-Part 'anno' struct (objects -> class_ind, mask,
                                            parts -> part_name, mask)
      normals_distill/<id>.png              RGB, n = 2 * v / 255 - 1 (distilled pseudo labels)
      sal_distill/<id>.png                  grey, salient where v / 255 > 0.5 (distilled pseudo labels)

Only the folders of the requested tasks are needed (``normals`` also needs ``pascal-context/trainval``
unless ``normals_valid_classes=None``). ``ImageSets/Parts`` of the archive (a cache of object classes
the reference code writes) is not read.

How labels are made (the reference's rules, exactly where stated):

- ``semseg``: the PNG values (``int64 [H, W]``).
- ``edge``: pixels whose 4-neighbourhood (inside the image) holds a different LabelMap value,
  thinned to one pixel with ``skimage.morphology.thin`` (the reference thins the non-zero
  |Laplacian|; the two agree except where neighbours' differences cancel in the Laplacian sum).
- ``human_parts``: for every object of class 15 (person) with part annotations, each part mask is
  written with its group id (``PART_GROUPS``; later parts overwrite earlier ones); all other pixels,
  including persons' pixels outside any part, are 0. An image with no part pixel at all is ignored
  entirely (all 255), as the reference's ``AddIgnoreRegions`` does, so images without (annotated)
  people give no human-parts supervision and are skipped by the metric.
- ``normals``: decoded, renormalised to unit length; ignored (255) where the PNG is black (0, 0, 0)
  and, as in the reference, where the LabelMap class is not one of ``NORMALS_VALID_CLASSES`` (the
  PASCAL-Context classes that NYUD also has, plus tvmonitor: surfaces the distilling network saw).
  Stored vectors are taken as x right, y up, z towards the camera (``m3vit.tasks.base``); this is
  the common normal-map encoding, but the archive does not document it.
- ``sal``: ``v / 255 > 0.5`` as 0 / 1 (no ignored pixels).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from ..tasks import task_class
from ..tasks.base import IGNORE
from ..utils.errors import DataError
from ._io import FolderDataset, label_file, read_png, unit_vectors

__all__ = [
    "PascalContextMT", "VOC_CLASSES", "PART_GROUPS", "PERSON_CLASS_ID", "NORMALS_VALID_CLASSES",
    "context_edges", "read_label_map", "read_human_parts", "human_parts_label",
]

#: The 21 semantic classes of the multi-task setting (VOC order).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: PASCAL-Part class id of people (``class_ind`` of the objects in the part annotations).
PERSON_CLASS_ID = 15

#: PASCAL-Part person part name -> group id: 1 head, 2 torso, 3 upper arm, 4 lower arm + hand,
#: 5 upper leg, 6 lower leg + foot (0 is background).
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

#: PASCAL-Context (459-class LabelMap) ids whose surface normals are kept: the classes whose name
#: is also an NYUD class (except 'unknown'), plus tvmonitor (427) -- the reference's list.
NORMALS_VALID_CLASSES: tuple[int, ...] = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53,
    55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111,
    113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184,
    191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242,
    243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288,
    290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349,
    350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411,
    412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
)

_TREE = """\
PASCAL_MT/
  JPEGImages/<id>.jpg
  ImageSets/Context/{train,val}.txt     one image id per line
  semseg/pascal-context/<id>.png        21 classes (0 background + VOC 20), 255 ignored
  pascal-context/trainval/<id>.mat      'LabelMap' (edges, normals mask)
  human_parts/<id>.mat                  PASCAL-Part 'anno' struct
  normals_distill/<id>.png              RGB normals, n = 2*v/255 - 1
  sal_distill/<id>.png                  grey saliency, salient where v/255 > 0.5"""


def _loadmat(path: str) -> dict:
    """A MATLAB file's variables (SciPy is imported here, when a PASCAL label is first read)."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    with label_file(path, MatReadError, NotImplementedError):
        return scipy.io.loadmat(path)


def read_label_map(path: str) -> np.ndarray:
    """The ``LabelMap`` of a PASCAL-Context ``.mat`` file (``int64 [H, W]``)."""
    contents = _loadmat(path)
    if "LabelMap" not in contents:
        raise DataError(f"{path}: no 'LabelMap' variable (a PASCAL-Context label file is expected)")
    return np.asarray(contents["LabelMap"]).astype(np.int64)


def context_edges(label_map: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a label map (``bool [H, W]``).

    A pixel is a boundary candidate when one of its 4 neighbours inside the image has another label;
    the candidates (two pixels wide along every boundary) are thinned to one pixel.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise DataError(f"label_map must be 2-D [H, W], got shape {label_map.shape}")
    candidate = np.zeros(label_map.shape, dtype=bool)
    vertical = label_map[1:, :] != label_map[:-1, :]
    candidate[1:, :] |= vertical
    candidate[:-1, :] |= vertical
    horizontal = label_map[:, 1:] != label_map[:, :-1]
    candidate[:, 1:] |= horizontal
    candidate[:, :-1] |= horizontal
    from skimage.morphology import thin  # imported when edges are first derived

    return thin(candidate)


def _field(record: np.void, name: str, position: int):
    """A MATLAB struct field by name (positional in the reference's order when names are absent)."""
    names = record.dtype.names or ()
    return record[name] if name in names else record[position]


def read_human_parts(path: str) -> tuple[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]], ...]:
    """Objects of a PASCAL-Part ``.mat``: ``(class_ind, mask, [(part_name, part_mask), ...])`` each."""
    contents = _loadmat(path)
    try:
        objects = _field(contents["anno"][0, 0], "objects", 1)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"{path}: no 'anno.objects' struct (a PASCAL-Part annotation is expected)") from err
    parsed = []
    for obj in np.asarray(objects).reshape(-1):
        class_ind = int(np.asarray(_field(obj, "class_ind", 1)).reshape(-1)[0])
        mask = np.asarray(_field(obj, "mask", 2)).astype(bool)
        parts = []
        part_structs = np.asarray(_field(obj, "parts", 3))
        if part_structs.dtype.names is None:  # [] when the object has no part annotation
            part_structs = part_structs[:0]
        for part in part_structs.reshape(-1):
            name = str(np.asarray(_field(part, "part_name", 0)).reshape(-1)[0])
            parts.append((name, np.asarray(_field(part, "mask", 1)).astype(bool)))
        parsed.append((class_ind, mask, parts))
    return tuple(parsed)


def human_parts_label(objects: Iterable[tuple[int, np.ndarray, Sequence[tuple[str, np.ndarray]]]],
                      shape: tuple[int, int], source: str = "human parts") -> np.ndarray:
    """The 6-group part map (``int64 [H, W]``) of parsed objects; all ``IGNORE`` when no part pixel."""
    label = np.zeros(shape, dtype=np.int64)
    for class_ind, _, parts in objects:
        if class_ind != PERSON_CLASS_ID:
            continue
        for name, mask in parts:
            if name not in PART_GROUPS:
                raise DataError(f"{source}: unknown person part {name!r}; known parts are {sorted(PART_GROUPS)}")
            if mask.shape != tuple(shape):
                raise DataError(f"{source}: part mask {name!r} is {mask.shape}, expected {tuple(shape)}")
            label[mask] = PART_GROUPS[name]
    if not (label > 0).any():
        label[:] = IGNORE
    return label


class PascalContextMT(FolderDataset):
    """PASCAL-Context multi-task dataset: ``semseg``, ``human_parts``, ``normals``, ``sal``, ``edge``.

    Samples: ``image float32 [3, H, W]`` in [0, 1], one label per task in the ``m3vit.tasks.base``
    format, ``meta = {"dataset", "split", "index", "id", "size": (H, W)}``. ``transform(sample, rng)``
    is applied last with ``rng = self.rng(index)`` (depends on seed, split, index and ``set_epoch``).
    ``normals_valid_classes``: LabelMap ids whose normals are kept (default the reference's list;
    ``None`` keeps every pixel and needs no LabelMap). See the module docstring for the tree and rules.
    """

    dataset_name = "pascal_context"
    tree_name = "PASCAL_MT"
    tree = _TREE
    splits = ("train", "val")
    split_pattern = "ImageSets/Context/{split}.txt"
    file_patterns = {
        "image": ("JPEGImages/{id}.jpg",),
        "semseg": ("semseg/VOC12/{id}.png", "semseg/pascal-context/{id}.png"),
        "human_parts": ("human_parts/{id}.mat",),
        "normals": ("normals_distill/{id}.png",),
        "sal": ("sal_distill/{id}.png",),
        "edge": ("pascal-context/trainval/{id}.mat",),
        "label_map": ("pascal-context/trainval/{id}.mat",),
    }
    all_tasks = ("semseg", "human_parts", "normals", "sal", "edge")
    channels = {**{t: task_class(t).default_channels for t in all_tasks}, "semseg": len(VOC_CLASSES)}
    classes = VOC_CLASSES
    #: Per-task loss weights of the reference recipe (M³ViT / ATRC code base).
    REFERENCE_LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0}

    def __init__(self, root: str | os.PathLike, split: str = "train", tasks: Sequence[str] | None = None,
                 transform: Callable | None = None, seed: int = 0,
                 normals_valid_classes: Iterable[int] | None = NORMALS_VALID_CLASSES) -> None:
        if normals_valid_classes is None:
            self.normals_valid_classes = None
        else:
            self.normals_valid_classes = np.array(sorted({int(c) for c in normals_valid_classes}), dtype=np.int64)
        extra = {"normals": ("label_map",)} if self.normals_valid_classes is not None else {}
        self._setup(root, split, tasks, transform, seed, extra)

    def _load_label(self, task: str, index: int, size: tuple[int, int]) -> torch.Tensor:
        path = self._paths[task][index]
        if task == "semseg":
            values = read_png(path).astype(np.int64)
            if values.ndim != 2:
                raise DataError(f"{path}: semseg PNG must be single-channel, got shape {values.shape}")
            bad = (values >= len(VOC_CLASSES)) & (values != IGNORE)
            if bad.any():
                raise DataError(f"{path}: label value {int(values[bad][0])} is neither a class id 0..20 nor 255")
            return torch.from_numpy(values)
        if task == "edge":
            edges = context_edges(read_label_map(path))
            return torch.from_numpy(edges.astype(np.float32))[None]
        if task == "sal":
            grey = read_png(path, mode="L").astype(np.float32)
            return torch.from_numpy((grey / 255.0 > 0.5).astype(np.float32))[None]
        if task == "human_parts":
            objects = read_human_parts(path)
            shape = objects[0][1].shape if objects else size
            return torch.from_numpy(human_parts_label(objects, shape, source=path))
        if task == "normals":
            return torch.from_numpy(self._normals(index))
        raise KeyError(task)

    def _normals(self, index: int) -> np.ndarray:
        path = self._paths["normals"][index]
        rgb = read_png(path, mode="RGB")
        invalid = (rgb[..., 0] == 0) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)
        if self.normals_valid_classes is not None:
            label_map = read_label_map(self._paths["label_map"][index])
            if label_map.shape != invalid.shape:
                raise DataError(f"{self._paths['label_map'][index]}: LabelMap is {label_map.shape}, "
                                 f"normals {path} are {invalid.shape}")
            invalid |= ~np.isin(label_map, self.normals_valid_classes)
        return unit_vectors(rgb * (2.0 / 255.0) - 1.0, invalid)
