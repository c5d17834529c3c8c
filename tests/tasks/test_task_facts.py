"""What each task declares about itself (title, default channels, headline metrics, metric options) and
its ``decode`` / ``resize_label``, each against a slow per-pixel reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.models import TASK_CHANNELS
from m3vit.tasks import TASK_CLASSES, default_task_channels, get_task, list_tasks, task_class, task_title
from m3vit.tasks.base import IGNORE

FAST = settings(max_examples=25, deadline=None)


def test_every_task_declares_its_facts():
    assert sorted(cls.name for cls in TASK_CLASSES) == list_tasks()
    for cls in TASK_CLASSES:
        task = cls()
        assert isinstance(cls.title, str) and cls.title
        assert task.channels == cls.default_channels >= 1
        assert cls.headline_metrics and set(cls.headline_metrics) <= set(cls.higher_is_better), cls.name
        assert cls.primary_metric in cls.headline_metrics, cls.name
    assert [task_title(n) for n in ("human_parts", "sal", "edge")] == ["human parts", "saliency", "edges"]
    assert task_title("panoptic") == "panoptic"  # an unknown task is its own title


def test_model_channels_come_from_the_task_classes():
    assert TASK_CHANNELS == default_task_channels()
    assert list(TASK_CHANNELS) == [cls.name for cls in TASK_CLASSES]  # the canonical order
    assert default_task_channels() is not default_task_channels()


def test_metric_options_from_the_eval_config():
    eval_cfg = SimpleNamespace(edge_thresholds=3, edge_max_dist=0.011, edge_workers=0)
    edge = get_task("edge")
    assert edge.metric_options(eval_cfg) == {"num_thresholds": 3, "max_dist": 0.011, "workers": 0}
    assert len(edge.new_metric(**edge.metric_options(eval_cfg)).thresholds) == 3
    assert edge.metric_options(None) == {}
    for name in list_tasks():
        if name != "edge":
            assert get_task(name).metric_options(eval_cfg) == {}, name


# --- decode: the displayable values of a raw output -----------------------------------------------

def _slow_decode(name: str, pred: np.ndarray) -> np.ndarray:
    """Per pixel, in float64: argmax ids, sigmoid probabilities, unit vectors or the value itself."""
    c, h, w = pred.shape
    out = np.zeros((c, h, w) if name == "normals" else (h, w))
    for i in range(h):
        for j in range(w):
            v = [float(pred[k, i, j]) for k in range(c)]
            if task_class(name).label_kind == "class":
                out[i, j] = max(range(c), key=lambda k: v[k])
            elif name in ("sal", "edge"):
                out[i, j] = 1 / (1 + math.exp(-v[0]))
            elif name == "normals":
                length = max(math.sqrt(sum(x * x for x in v)), 1e-12)
                out[:, i, j] = [x / length for x in v]
            else:
                out[i, j] = v[0]
    return out


@FAST
@given(seed=st.integers(0, 2**31), h=st.integers(1, 6), w=st.integers(1, 6))
def test_decode_matches_a_slow_reference(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    for name in list_tasks():
        task = get_task(name)
        pred = torch.randn(task.channels, h, w, generator=g) * 4
        decoded = task.decode(pred)
        expected = _slow_decode(name, pred.double().numpy())
        assert decoded.shape == expected.shape, name
        if task.label_kind == "class":
            assert decoded.dtype == np.uint8 and np.array_equal(decoded, expected), name
        else:
            assert decoded.dtype == np.float32, name
            np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6, err_msg=name)


# --- resize_label: nearest pixels, then the task's value fix-up --------------------------------------

def _slow_resize(name: str, label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output pixel (r, c) copies source pixel (floor((r + .5) H / h), floor((c + .5) W / w)); normals are
    then divided by their length, and a pixel with 255 in any channel becomes 255 in all three."""
    h_in, w_in = label.shape[-2:]
    out = np.zeros((*label.shape[:-2], *size), dtype=np.float64)
    for r in range(size[0]):
        for c in range(size[1]):
            sr = min(math.floor((r + 0.5) * h_in / size[0]), h_in - 1)
            sc = min(math.floor((c + 0.5) * w_in / size[1]), w_in - 1)
            value = label[..., sr, sc].astype(np.float64)
            if name == "normals":
                if (value == IGNORE).any():
                    value = np.full(3, float(IGNORE))
                else:
                    value = value / max(math.sqrt(float((value * value).sum())), 1e-12)
            out[..., r, c] = value
    return out


def _random_label(name: str, h: int, w: int, g: np.random.Generator) -> torch.Tensor:
    task = get_task(name)
    ignored = g.random((h, w)) < 0.2
    if task.label_kind == "class":
        label = g.integers(0, task.channels, (h, w))
        label[ignored] = IGNORE
        return torch.from_numpy(label)
    label = g.normal(size=(task.label_channels, h, w)) * 2  # normals deliberately not unit
    if name != "normals":
        label = (label > 0).astype(np.float64) if name in ("sal", "edge") else np.abs(label) + 0.5
    label[:, ignored] = IGNORE
    if name == "normals":
        label[0, g.random((h, w)) < 0.1] = IGNORE  # one channel only: the whole pixel is ignored
    return torch.from_numpy(label).float()


@FAST
@given(seed=st.integers(0, 2**31), h=st.integers(1, 9), w=st.integers(1, 9),
       size=st.tuples(st.integers(1, 12), st.integers(1, 12)))
def test_resize_label_matches_a_slow_reference(seed, h, w, size):
    g = np.random.default_rng(seed)
    for name in list_tasks():
        label = _random_label(name, h, w, g)
        resized = get_task(name).resize_label(label, size)
        assert resized.dtype == label.dtype and tuple(resized.shape[-2:]) == size, name
        expected = _slow_resize(name, label.numpy(), size)
        if name == "normals":
            np.testing.assert_allclose(resized.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(resized.numpy(), expected), name  # values copied, never blended


def test_resize_label_keeps_ignored_normals_whole():
    label = torch.tensor([[[3.0, 255.0]], [[4.0, 0.5]], [[0.0, 0.5]]])  # pixel 1: 255 in x only
    out = get_task("normals").resize_label(label, (1, 2))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.6, 0.8, 0.0]))
    assert (out[:, 0, 1] == IGNORE).all()


@pytest.mark.parametrize("name", ["semseg", "sal", "depth"])
def test_resize_values_is_the_identity_for_other_tasks(name):
    label = _random_label(name, 4, 5, np.random.default_rng(0))
    assert get_task(name).resize_values(label) is label
