"""Build what a run config describes: datasets, task objects, loss weights and the model."""

from __future__ import annotations

from typing import Any

import torch

from ..data import dataset_from_config, reference_loss_weights
from ..data.show import dataset_tasks
from ..models import create_model
from ..models.config import ConfigError
from ..tasks import Task
from .config import RunConfig

__all__ = ["build_train_dataset", "build_eval_dataset", "run_tasks", "build_tasks", "loss_weights", "build_model", "collate"]


def build_train_dataset(cfg: RunConfig):
    """The training split with the configured augmentation (ImageNet-normalised images of ``data.size``):
    flip, the ``data.scale_rotate`` recipe of the dataset, then ``data.augment`` to the size. How a dataset
    builds from the ``data`` section is its own ``from_config`` (``m3vit.data.dataset_from_config``)."""
    return dataset_from_config(cfg.data, cfg.data.train_split, train=True)


def build_eval_dataset(cfg: RunConfig, split: str | None = None):
    """The evaluation split, untransformed: images in ``[0, 1]`` and labels at their own resolution.

    The evaluator resizes and normalises images itself and upsamples predictions to each label, so
    metrics are computed on the original labels (the field's protocol).
    """
    return dataset_from_config(cfg.data, cfg.data.val_split if split is None else split, train=False)


def run_tasks(cfg: RunConfig) -> list[str]:
    """The tasks a run of ``cfg`` trains: ``data.tasks``, or every task its training split provides."""
    return list(build_train_dataset(cfg).tasks) if cfg.data.tasks is None else list(cfg.data.tasks)


def build_tasks(task_channels: dict[str, int], dataset: Any = None) -> dict[str, Task]:
    """Task objects (loss, metric, colours) for the model's tasks, sized to its output channels.

    Class names come from ``dataset`` (``classes`` / ``part_names``) when it has them and they match.
    """
    return dataset_tasks(dataset, task_channels)


def loss_weights(cfg: RunConfig, tasks: list[str]) -> dict[str, float]:
    """``train.loss_weights`` or the dataset's reference weights, for ``tasks`` (a missing task: error)."""
    weights = cfg.train.loss_weights
    if weights is None:
        weights = reference_loss_weights(cfg.data.name)
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise ConfigError(f"train.loss_weights: no weight for task(s) {missing}; give one per task of {tasks}")
    return {t: float(weights[t]) for t in tasks}


def build_model(cfg: RunConfig, task_channels: dict[str, int]):
    """The model of ``cfg.model`` for ``task_channels`` at ``data.size`` (backbone from ``model.pretrained``)."""
    return create_model(cfg.model.name, dict(task_channels), img_size=cfg.data.size,
                        pretrained=cfg.model.pretrained, **cfg.model_overrides())


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack a list of same-size samples into a batch; ``meta`` becomes a list of dicts."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
