"""Gradient conflicts: cosines against an independent float64 computation with ``.backward()``, the
constructed cases (opposed losses give -1, disjoint parameters give 0, a zero gradient gives NaN), the
caller's state left alone, the dataset-level report and its figure."""

from __future__ import annotations

import copy
import json
import math
from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from m3vit.analysis import (gradient_conflicts, measure_conflicts, parameter_groups, plot_conflict_evolution,
                            plot_conflict_matrices, task_gradient_cosines)
from m3vit.data import SyntheticScenes, preprocess
from m3vit.models import create_model
from m3vit.tasks import get_task

TASKS = {"semseg": 8, "human_parts": 7, "sal": 1, "depth": 1}  # semseg sized to the scenes, not the default 21
MICRO = dict(embed_dim=16, depth=3, num_heads=2, head_channels=8, num_experts=4, top_k=2, moe_blocks=[1])


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes("val", size=(32, 32), length=6, seed=0, tasks=list(TASKS), people="close")


def _model(router="multi_gate", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return create_model("m3vit_micro", TASKS, img_size=(32, 32), router=router, **MICRO).to(dtype)


def _batch(scenes, n=3, dtype=torch.float32):
    samples = [scenes[i] for i in range(n)]
    images = preprocess([s["image"] for s in samples], (32, 32)).to(dtype)
    return images, {t: torch.stack([s[t] for s in samples]) for t in TASKS}


def _reference(model, images, targets, names=None):
    """Independent: per task, ``.backward()`` on a copy, ``.grad`` of the backbone parameters in float64,
    a plain dot-product cosine; ``names`` restricts to those parameters."""
    model = copy.deepcopy(model).double()
    images = images.double()
    flat = {}
    for task, channels in model.config.tasks.items():
        for p in model.parameters():
            p.grad = None
        pred = model(images, tasks=[task])[task]
        if task in ("semseg", "human_parts"):
            loss_fn = get_task(task, num_classes=channels).loss
        else:
            loss_fn = get_task(task).loss
        loss_fn(pred, targets[task]).backward()
        parts = []
        for name, p in model.backbone.named_parameters():
            if names is not None and name not in names:
                continue
            parts.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double())
        flat[task] = torch.cat(parts)
    out = {}
    tasks = list(model.config.tasks)
    for i, j in combinations(range(len(tasks)), 2):
        a, b = flat[tasks[i]], flat[tasks[j]]
        dot = sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist()))
        norm_a = math.sqrt(sum(float(x) ** 2 for x in a.tolist()))
        norm_b = math.sqrt(sum(float(x) ** 2 for x in b.tolist()))
        out[f"{tasks[i]}|{tasks[j]}"] = dot / (norm_a * norm_b)
    return out


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_cosines_match_an_independent_float64_computation(scenes, router):
    model = _model(router).eval()
    images, targets = _batch(scenes)
    expected = _reference(model, images, targets)
    assert list(expected) == ["semseg|human_parts", "semseg|sal", "semseg|depth", "human_parts|sal",
                              "human_parts|depth", "sal|depth"]
    double = task_gradient_cosines(copy.deepcopy(model).double(), images.double(), targets)
    assert list(double) == list(expected)
    for key, value in expected.items():
        assert double[key] == pytest.approx(value, abs=1e-10), key
    single = task_gradient_cosines(model, images, targets)
    for key, value in expected.items():
        assert single[key] == pytest.approx(value, abs=2e-4), key
        assert -1.0 <= single[key] <= 1.0


def test_per_block_cosines_match_the_reference_restricted_to_the_block(scenes):
    model = _model().eval()
    images, targets = _batch(scenes, 2)
    result = gradient_conflicts(copy.deepcopy(model).double(), images.double(), targets)
    groups = dict(parameter_groups(model))
    assert result.groups == ["embed", "block0", "block1", "block2"] == list(groups)
    assert sum(len(v) for v in groups.values()) == len(list(model.backbone.parameters()))
    per_group = result.group_pairs()
    for group in ("embed", "block1"):
        expected = _reference(model, images, targets, set(groups[group]))
        for key, value in expected.items():
            assert per_group[group][key] == pytest.approx(value, abs=1e-10), (group, key)
    # the gram over the groups adds up to the whole: the overall cosine is consistent with the group norms
    assert np.allclose((result.group_norm ** 2).sum(0), result.norm ** 2)


def test_tasks_argument_keeps_the_model_order_and_the_subset(scenes):
    model = _model().eval()
    images, targets = _batch(scenes, 2)
    subset = task_gradient_cosines(model, images, targets, tasks=["depth", "semseg"])
    assert list(subset) == ["semseg|depth"]
    assert subset["semseg|depth"] == pytest.approx(task_gradient_cosines(model, images, targets)["semseg|depth"],
                                                   abs=1e-6)
    with pytest.raises(ValueError, match="no labels for task"):
        task_gradient_cosines(model, images, {"semseg": targets["semseg"]})


@pytest.mark.parametrize("training", [False, True])
def test_the_callers_state_is_left_alone(scenes, training):
    model = _model()
    model.train(training)
    images, targets = _batch(scenes, 2)
    sentinel = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    task_gradient_cosines(model, images, targets)
    assert model.training is training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n]), n
        assert torch.equal(p.detach(), weights[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


# ----------------------------------------------------------------------------------------------
# Constructed cases on a duck-typed model (backbone, tasks, config.tasks, forward(images, tasks))
# ----------------------------------------------------------------------------------------------
class _Toy(nn.Module):
    """Two tasks; ``route`` maps a task to the backbone module it goes through."""

    def __init__(self, backbone: nn.Module, route: dict[str, str], size=(4, 4)):
        super().__init__()
        self.backbone = backbone
        self.route = route
        self.tasks = list(route)
        self.config = SimpleNamespace(tasks={t: 1 for t in route})
        self.size = size

    def resolve_tasks(self, tasks):
        return list(self.tasks) if tasks is None else [t for t in tasks]

    def forward(self, images, tasks=None):
        features = images.mean(dim=(2, 3))
        out = {}
        for task in self.resolve_tasks(tasks):
            value = getattr(self.backbone, self.route[task])(features)  # [B, 1]
            out[task] = value[:, :, None, None].expand(-1, 1, *self.size)
        return out


def test_losses_pulling_in_opposite_directions_give_minus_one():
    torch.manual_seed(0)
    backbone = nn.ModuleDict({"shared": nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))})
    model = _Toy(backbone, {"depth": "shared", "edge": "shared"})
    images = torch.randn(1, 3, 4, 4)
    # depth's L1 loss wants the output up (label 100), edge's BCE wants it down (label 0)
    targets = {"depth": torch.full((1, 1, 4, 4), 100.0), "edge": torch.zeros(1, 1, 4, 4)}
    result = gradient_conflicts(model, images, targets)
    assert result.pairs()["depth|edge"] == pytest.approx(-1.0, abs=1e-12)
    assert result.conflict_fraction == 1.0
    assert result.groups == ["other"]
    # the same wish gives +1
    agree = {"depth": torch.full((1, 1, 4, 4), -100.0), "edge": torch.zeros(1, 1, 4, 4)}
    assert task_gradient_cosines(model, images, agree)["depth|edge"] == pytest.approx(1.0, abs=1e-12)


def test_disjoint_parameters_give_zero_and_a_zero_gradient_is_undefined():
    torch.manual_seed(0)
    backbone = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    model = _Toy(backbone, {"depth": "a", "sal": "b"})
    images = torch.randn(2, 3, 4, 4)
    targets = {"depth": torch.full((2, 1, 4, 4), 3.0), "sal": (torch.rand(2, 1, 4, 4) > 0.5).float()}
    result = gradient_conflicts(model, images, targets)
    assert result.pairs() == {"depth|sal": 0.0}
    assert result.conflict_fraction == 0.0
    assert (result.norm > 0).all()
    # every pixel ignored: the loss is a constant, its gradient zero, the cosine undefined
    targets["sal"] = torch.full((2, 1, 4, 4), 255.0)
    result = gradient_conflicts(model, images, targets)
    assert math.isnan(result.pairs()["depth|sal"]) and result.norm[1] == 0
    assert math.isnan(result.conflict_fraction)


# ----------------------------------------------------------------------------------------------
# Over a dataset; figures
# ----------------------------------------------------------------------------------------------
def test_measure_conflicts_over_batches(scenes, tmp_path):
    model = _model().eval()
    report = measure_conflicts(model, scenes, batches=3, batch_size=2)
    assert len(report.batches) == 3 and report.num_images == 6
    per_batch = [b.pairs() for b in report.batches]
    for key, value in report.pairs().items():
        assert value == pytest.approx(np.mean([p[key] for p in per_batch]))
    every = [v for p in per_batch for v in p.values()]
    assert report.conflict_fraction == pytest.approx(np.mean([v < 0 for v in every]))
    # the first batch is exactly gradient_conflicts on the same images
    images, targets = _batch(scenes, 2)
    direct = task_gradient_cosines(model, images, targets)
    for key, value in direct.items():
        assert per_batch[0][key] == pytest.approx(value, abs=1e-6)
    data = report.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["tasks"] == list(TASKS) and len(data["cosine"]) == 4 and set(data["groups"]) == {
        "embed", "block0", "block1", "block2"}
    assert "| semseg |" in report.to_markdown()
    # more batches than the data holds: as many as there are
    assert len(measure_conflicts(model, scenes, batches=9, batch_size=4).batches) == 2
    path = plot_conflict_matrices({"a": report.mean_cosine, "b": -report.mean_cosine}, report.tasks,
                                  tmp_path / "c.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300
    path = plot_conflict_evolution({10: report, 20: report}, tmp_path / "e.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert not list(tmp_path.glob("*.tmp*"))


def test_measure_conflicts_refuses_missing_labels_and_bad_counts(scenes):
    model = _model().eval()
    with pytest.raises(ValueError, match="batches and batch_size"):
        measure_conflicts(model, scenes, batches=0)
    only_depth = SyntheticScenes("val", size=(32, 32), length=2, tasks=["depth"])
    with pytest.raises(ValueError, match="no labels for task"):
        measure_conflicts(model, only_depth)
