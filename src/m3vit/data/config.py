"""The ``data`` section of a run config as the data layer sees it: ``DataSettings`` names the fields a dataset's
``from_config`` reads, and ``configured_train_transforms`` is the augmentation they configure.

The section itself is ``m3vit.engine.config.DataSection`` (typed, validated, with the run's other sections).
The data layer sits below the engine and never imports it, so it states the fields it reads as a
``typing.Protocol``: ``DataSection`` satisfies it structurally, and so does any object with these attributes
(a test's ``SimpleNamespace``, a script's own settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .transforms import Compose, scale_rotate_recipe, train_transforms

__all__ = ["DataSettings", "configured_train_transforms", "dataset_scale_rotate"]


@runtime_checkable
class DataSettings(Protocol):
    """The fields of a run config's ``data`` section that datasets read (see ``engine.config.DataSection``)."""

    name: str
    root: str | None
    size: Sequence[int]
    seed: int
    tasks: Sequence[str] | None
    train_length: int
    val_length: int
    augment: str
    scale_rotate: str
    people: str | None


def dataset_scale_rotate(dataset: type, recipe: str) -> dict:
    """``RandomScaleRotate`` options of ``recipe`` for a dataset class: ``reference`` is the class's own
    ``REFERENCE_SCALE_ROTATE`` when it declares one, else the PASCAL recipe; ``pascal`` the PASCAL recipe."""
    return scale_rotate_recipe(recipe, getattr(dataset, "REFERENCE_SCALE_ROTATE", None))


def configured_train_transforms(data: DataSettings, dataset: type) -> Compose:
    """The training augmentation of ``data`` for a dataset class when ``data.augment`` is ``crop`` or
    ``resize``: flip, the ``data.scale_rotate`` recipe (``dataset_scale_rotate``), then ``data.augment`` to
    ``data.size``, then ImageNet normalisation (``transforms.train_transforms``)."""
    return train_transforms(data.size, mode=data.augment, **dataset_scale_rotate(dataset, data.scale_rotate))
