"""Datasets, image reading and joint transforms: procedural ``SyntheticScenes``, ``PascalContextMT``, ``NYUDMT``,
and ``read_image`` (``m3vit.data.images``), the one image reader of m3vit.

Every dataset returns samples ``{"image": float32 [3, H, W] in [0, 1], <task>: label, "meta": {...}}``
with labels in the format of ``m3vit.tasks.base`` and exposes ``tasks``, ``task_channels`` (what
``create_model`` needs), ``classes`` and ``set_epoch``. ``build_dataset`` makes one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..utils.errors import ConfigError
from .images import MAX_PIXELS, ImageReadError, ImageTooLargeError, read_image
from .nyud import NYUD_CLASSES, NYUDMT
from .pascal_context import VOC_CLASSES, PascalContextMT
from .synthetic import SyntheticScenes
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PASCAL_SCALE_ROTATE,
    SCALE_ROTATE_RECIPES,
    Compose,
    Normalize,
    PadCrop,
    RandomHorizontalFlip,
    RandomScaleRotate,
    Resize,
    eval_transforms,
    preprocess,
    resize_image,
    train_transforms,
)

__all__ = [
    "DATASETS", "build_dataset", "SyntheticScenes", "PascalContextMT", "NYUDMT", "VOC_CLASSES", "NYUD_CLASSES",
    "IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Normalize", "PadCrop", "RandomHorizontalFlip",
    "RandomScaleRotate", "Resize", "eval_transforms", "train_transforms", "SCALE_ROTATE_RECIPES",
    "scale_rotate_options", "reference_loss_weights", "read_image", "ImageReadError", "ImageTooLargeError",
    "MAX_PIXELS", "preprocess", "resize_image",
]

#: Dataset name -> class (the names configs and the CLI use).
DATASETS = {"synthetic": SyntheticScenes, "pascal_context": PascalContextMT, "nyud": NYUDMT}


def scale_rotate_options(name: str, recipe: str = "reference") -> dict:
    """``RandomScaleRotate`` options of dataset ``name`` for ``recipe`` (``data.scale_rotate``):
    ``reference`` is the official recipe of the dataset (its ``REFERENCE_SCALE_ROTATE``, else PASCAL's),
    ``pascal`` the PASCAL recipe (scale U(0.75, 1.25), rotation U(±20°))."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    if recipe not in SCALE_ROTATE_RECIPES:
        raise ValueError(f"recipe must be one of {list(SCALE_ROTATE_RECIPES)}, got {recipe!r}")
    if recipe == "reference":
        return dict(getattr(DATASETS[name], "REFERENCE_SCALE_ROTATE", PASCAL_SCALE_ROTATE))
    return dict(PASCAL_SCALE_ROTATE)


def reference_loss_weights(name: str) -> dict[str, float]:
    """Per-task loss weights of the reference recipe for dataset ``name`` (its ``REFERENCE_LOSS_WEIGHTS``;
    a fresh dict)."""
    if name not in DATASETS:
        raise ConfigError(f"no reference loss weights for dataset {name!r}; known datasets are {sorted(DATASETS)}")
    return dict(DATASETS[name].REFERENCE_LOSS_WEIGHTS)


def build_dataset(name: str, split: str = "train", *, root: str | None = None, size: Sequence[int] | None = None,
                  length: int | None = None, seed: int = 0, tasks: Sequence[str] | None = None,
                  transform: Callable | None = None, people: str | None = None):
    """A dataset by name.

    ``synthetic`` renders at ``size`` (default 128x128) and has ``length`` samples (default 1000) with
    ``people`` (``"sparse"`` when None, or ``"close"``: ``SyntheticScenes``' option); the
    folder datasets need ``root`` and, when ``size`` is given and no ``transform`` is, are resized to it
    (labels nearest, image not normalised). ``transform`` is applied as given otherwise.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    if name == "synthetic":
        if root is not None:
            raise ConfigError("the synthetic dataset is rendered, not read: drop --root / data.root")
        return SyntheticScenes(split, size=(128, 128) if size is None else size, length=1000 if length is None else length,
                               seed=seed, tasks=tasks, transform=transform, people=people or "sparse")
    if root is None:
        raise ConfigError(f"dataset {name!r} needs its root folder (--root / data.root)")
    if length is not None:
        raise ConfigError(f"dataset {name!r} has a fixed length; 'length' applies to the synthetic dataset only")
    if people is not None:
        raise ConfigError(f"dataset {name!r} shows real people; 'people' applies to the synthetic dataset only")
    if transform is None and size is not None:
        transform = Resize(size)
    return DATASETS[name](root, split, tasks=tasks, transform=transform, seed=seed)
