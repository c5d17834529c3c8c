"""The cross-task head: the identity when built, then ``p_t + conv1x1_t(ReLU(GroupNorm(conv3x3(cat p))))``
against a float64 reference; every task's prediction is required."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m3vit.nn import CrossTaskHead

F64 = torch.float64
CHANNELS = {"semseg": 5, "depth": 1, "normals": 3}


def cross_task_ref(head, predictions):
    conv, norm = head.mix[0], head.mix[1]
    x = F.conv2d(torch.cat([predictions[t] for t in CHANNELS], 1), conv.weight, None, padding=1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    x = torch.clamp(x, min=0)
    return {t: p + F.conv2d(x, head.refine[t].weight, head.refine[t].bias) for t, p in predictions.items()}


def test_cross_task_head_starts_as_the_identity_then_mixes_every_task():
    torch.manual_seed(0)
    head = CrossTaskHead(CHANNELS, hidden=6).to(F64)
    predictions = {t: torch.randn(2, c, 5, 7, dtype=F64) for t, c in CHANNELS.items()}
    refined = head(predictions)
    assert all(torch.equal(refined[t], predictions[t]) for t in CHANNELS)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_()
    refined, expected = head(predictions), cross_task_ref(head, predictions)
    for task in CHANNELS:
        torch.testing.assert_close(refined[task], expected[task], rtol=1e-10, atol=1e-10)
    assert not torch.equal(refined["depth"], predictions["depth"])


def test_cross_task_head_needs_every_task():
    head = CrossTaskHead(CHANNELS)
    with pytest.raises(ValueError, match=r"missing \['normals'\]"):
        head({"semseg": torch.zeros(1, 5, 4, 4), "depth": torch.zeros(1, 1, 4, 4)})
    with pytest.raises(ValueError, match="at least one task"):
        CrossTaskHead({})
