"""Datasets, image reading and joint transforms: procedural ``SyntheticScenes``, ``PascalContextMT``, ``NYUDMT``,
and ``read_image`` (``m3vit.data.images``), the one image reader of m3vit.

Every dataset returns samples ``{"image": float32 [3, H, W] in [0, 1], <task>: label, "meta": {...}}``
with labels in the format of ``m3vit.tasks.base`` and exposes ``tasks``, ``task_channels`` (what
``create_model`` needs), ``classes`` and ``set_epoch``. ``build_dataset`` makes one by name and options,
``dataset_from_config`` from a run config's ``data`` section: each dataset class says how (its ``from_options``
and ``from_config``: transform, length, which options apply).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..utils.errors import ConfigError
from .config import DataSettings, dataset_scale_rotate
from .images import MAX_PIXELS, ImageReadError, ImageTooLargeError, read_image
from .nyud import NYUD_CLASSES, NYUDMT
from .pascal_context import VOC_CLASSES, PascalContextMT
from .synthetic import SyntheticScenes
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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
    "DATASETS", "build_dataset", "dataset_from_config", "DataSettings", "SyntheticScenes", "PascalContextMT", "NYUDMT", "VOC_CLASSES", "NYUD_CLASSES",
    "IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Normalize", "PadCrop", "RandomHorizontalFlip",
    "RandomScaleRotate", "Resize", "eval_transforms", "train_transforms", "SCALE_ROTATE_RECIPES",
    "scale_rotate_options", "reference_loss_weights", "datasets_with_people", "read_image", "ImageReadError", "ImageTooLargeError",
    "MAX_PIXELS", "preprocess", "resize_image",
]

#: Dataset name -> class (the names configs and the CLI use).
DATASETS = {"synthetic": SyntheticScenes, "pascal_context": PascalContextMT, "nyud": NYUDMT}


def datasets_with_people() -> list[str]:
    """Names of the datasets that take a ``people`` option (``people_modes`` declared), for messages."""
    return [name for name, dataset in DATASETS.items() if dataset.people_modes]


def scale_rotate_options(name: str, recipe: str = "reference") -> dict:
    """``RandomScaleRotate`` options of dataset ``name`` for ``recipe`` (``data.scale_rotate``):
    ``reference`` is the official recipe of the dataset (its ``REFERENCE_SCALE_ROTATE``, else PASCAL's),
    ``pascal`` the PASCAL recipe (scale U(0.75, 1.25), rotation U(±20°))."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    return dataset_scale_rotate(DATASETS[name], recipe)


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
    return _dataset_class(name).from_options(split, root=root, size=size, length=length, seed=seed, tasks=tasks,
                                             transform=transform, people=people)


def dataset_from_config(data: DataSettings, split: str, *, train: bool):
    """The dataset of a run config's ``data`` section (``m3vit.engine.config.DataSection`` or any object with
    the fields of ``DataSettings``) for ``split``: ``DATASETS[data.name].from_config``. ``train=True`` gives the
    training augmentation of ``data.augment``; ``train=False`` the untransformed evaluation samples."""
    return _dataset_class(data.name).from_config(data, split, train=train)


def _dataset_class(name: str) -> type:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    return DATASETS[name]
