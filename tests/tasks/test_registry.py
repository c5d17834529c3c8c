"""Task lookup, options and channel defaults."""

import pytest

from m3vit.models.registry import TASK_CHANNELS
from m3vit.tasks import Task, get_task, list_tasks


def test_every_model_task_is_known_with_the_same_default_channels():
    assert sorted(TASK_CHANNELS) == list_tasks()
    for name, channels in TASK_CHANNELS.items():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and task.channels == channels
        assert task.primary_metric in task.higher_is_better


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="known tasks are .*semseg"):
        get_task("panoptic")


def test_options():
    assert get_task("semseg", num_classes=40).channels == 40
    assert get_task("human_parts").class_names[1] == "head"
    assert get_task("edge", pos_weight=0.9).pos_weight == 0.9
    with pytest.raises(TypeError, match="num_class"):
        get_task("semseg", num_class=40)
    with pytest.raises(TypeError, match="pos_weight"):
        get_task("sal", pos_weight=0.9)
    with pytest.raises(ValueError, match="num_classes"):
        get_task("semseg", num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        get_task("semseg", num_classes=255)
    with pytest.raises(ValueError, match="class_names"):
        get_task("semseg", num_classes=2, class_names=["a"])
    with pytest.raises(ValueError, match="pos_weight"):
        get_task("edge", pos_weight=1.5)
    with pytest.raises(TypeError, match="bins"):
        get_task("normals").new_metric(bins=3)
