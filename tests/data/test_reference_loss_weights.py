"""Each dataset declares the reference recipe's per-task loss weights (``REFERENCE_LOSS_WEIGHTS``)."""

import pytest

from m3vit.data import DATASETS, reference_loss_weights
from m3vit.models import TASK_CHANNELS


def test_reference_loss_weights_per_dataset():
    pascal = {"semseg": 1, "human_parts": 2, "sal": 5, "edge": 50, "normals": 10}
    assert reference_loss_weights("pascal_context") == pascal
    assert reference_loss_weights("nyud") == {"semseg": 1, "depth": 1, "normals": 10, "edge": 50}
    assert set(reference_loss_weights("synthetic")) == set(TASK_CHANNELS)
    weights = reference_loss_weights("nyud")
    weights["semseg"] = 99
    assert reference_loss_weights("nyud")["semseg"] == 1  # a fresh dict each time
    with pytest.raises(ValueError, match="known datasets are .*nyud"):
        reference_loss_weights("coco")


def test_every_dataset_weights_every_task_it_has():
    for name, cls in DATASETS.items():
        tasks = getattr(cls, "all_tasks", None) or TASK_CHANNELS  # the synthetic scenes label every task
        assert set(cls.REFERENCE_LOSS_WEIGHTS) == set(tasks), name
