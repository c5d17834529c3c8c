"""Shared fixtures of the task tests."""

import pytest
import torch


def _valid_batch(task, b: int, h: int, w: int, seed: int = 0):
    """Random raw outputs ``[B, C, H, W]`` and a fully valid label batch of ``task``'s format."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, task.channels, h, w, generator=g)
    if task.label_kind == "class":
        target = torch.randint(0, task.channels, (b, h, w), generator=g)
    elif task.name == "normals":
        target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    else:
        target = (torch.rand(b, 1, h, w, generator=g) < 0.5).float() + (task.name == "depth")
    return pred, target


@pytest.fixture
def valid_batch():
    """``valid_batch(task, b, h, w)`` -> (raw outputs, labels with every pixel valid)."""
    return _valid_batch
