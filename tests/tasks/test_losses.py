"""Each task loss against a slow float64 per-pixel reference, with ignored pixels and empty batches."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.tasks import IGNORE, get_task

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batch_shapes(draw):
    return draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5))


def _ignore_mask(seed: int, shape, p_ignore: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p_ignore


# --- slow references: plain Python loops over pixels, float64 ---------------------------------


def ref_cross_entropy(pred, target):
    b, c, h, w = pred.shape
    total, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(target[i, y, x])
                if label == IGNORE:
                    continue
                logits = [float(pred[i, k, y, x]) for k in range(c)]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(v - top) for v in logits))
                total += log_z - logits[label]
                n += 1
    return total / n if n else 0.0


def ref_balanced_bce(pred, target, pos_weight=None):
    b, _, h, w = pred.shape
    pixels = [(float(pred[i, 0, y, x]), float(target[i, 0, y, x]))
              for i in range(b) for y in range(h) for x in range(w)]
    valid = [(p, t) for p, t in pixels if t != IGNORE]
    if not valid:
        return 0.0
    positives = [p for p, t in valid if t >= 0.5]
    negatives = [p for p, t in valid if t < 0.5]
    weight = len(negatives) / len(valid) if pos_weight is None else pos_weight
    loss_pos = sum(-math.log(1 / (1 + math.exp(-p))) for p in positives)
    loss_neg = sum(-math.log(1 - 1 / (1 + math.exp(-p))) for p in negatives)
    return (weight * loss_pos + (1 - weight) * loss_neg) / len(valid)


def ref_normals_l1(pred, target):
    b, _, h, w = pred.shape
    total, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = [float(target[i, k, y, x]) for k in range(3)]
                if all(v == IGNORE for v in label):
                    continue
                p = [float(pred[i, k, y, x]) for k in range(3)]
                norm = max(math.sqrt(sum(v * v for v in p)), 1e-12)
                total += sum(abs(p[k] / norm - label[k]) for k in range(3))
                n += 3
    return total / n if n else 0.0


def ref_depth_l1(pred, target):
    diffs = [
        abs(float(p) - float(t)) for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()) if t != IGNORE
    ]
    return sum(diffs) / len(diffs) if diffs else 0.0


# --- data ------------------------------------------------------------------------------------


def class_batch(seed, b, h, w, c, p_ignore):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, c, h, w, generator=g) * 3
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[_ignore_mask(seed + 1, (b, h, w), p_ignore)] = IGNORE
    return pred, target


def binary_batch(seed, b, h, w, p_ignore):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, 1, h, w, generator=g) * 4
    target = (torch.rand(b, 1, h, w, generator=g) < 0.3).float()
    target[_ignore_mask(seed + 1, (b, 1, h, w), p_ignore)] = IGNORE
    return pred, target


def normals_batch(seed, b, h, w, p_ignore):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, 3, h, w, generator=g)
    target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    ignore = _ignore_mask(seed + 1, (b, h, w), p_ignore)
    target.permute(0, 2, 3, 1)[ignore] = IGNORE
    return pred, target


def depth_batch(seed, b, h, w, p_ignore):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, 1, h, w, generator=g) * 5
    target = torch.rand(b, 1, h, w, generator=g) * 5 + 0.1
    target[_ignore_mask(seed + 1, (b, 1, h, w), p_ignore)] = IGNORE
    return pred, target


# --- tests -----------------------------------------------------------------------------------


@SETTINGS
@given(shape=batch_shapes(), seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.3, 1.0]),
       task_name=st.sampled_from(["semseg", "human_parts"]))
def test_cross_entropy_matches_reference(shape, seed, p_ignore, task_name):
    task = get_task(task_name, num_classes=4)
    pred, target = class_batch(seed, *shape, 4, p_ignore)
    got = task.loss(pred.double(), target)
    assert got.item() == pytest.approx(ref_cross_entropy(pred.double(), target), rel=1e-9, abs=1e-12)
    if p_ignore < 1.0 and (target != IGNORE).any():
        expected = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)(pred.double(), target)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


@SETTINGS
@given(shape=batch_shapes(), seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_sal_balanced_bce_matches_reference(shape, seed, p_ignore):
    pred, target = binary_batch(seed, *shape, p_ignore)
    got = get_task("sal").loss(pred.double(), target.double())
    assert got.item() == pytest.approx(ref_balanced_bce(pred.double(), target), rel=1e-9, abs=1e-12)


@SETTINGS
@given(shape=batch_shapes(), seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.3, 1.0]),
       pos_weight=st.sampled_from([0.95, 0.5, 0.7]))
def test_edge_weighted_bce_matches_reference(shape, seed, p_ignore, pos_weight):
    pred, target = binary_batch(seed, *shape, p_ignore)
    got = get_task("edge", pos_weight=pos_weight).loss(pred.double(), target.double())
    assert got.item() == pytest.approx(ref_balanced_bce(pred.double(), target, pos_weight), rel=1e-9, abs=1e-12)


@SETTINGS
@given(shape=batch_shapes(), seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_normals_l1_matches_reference(shape, seed, p_ignore):
    pred, target = normals_batch(seed, *shape, p_ignore)
    got = get_task("normals").loss(pred.double(), target.double())
    assert got.item() == pytest.approx(ref_normals_l1(pred.double(), target.double()), rel=1e-9, abs=1e-12)


@SETTINGS
@given(shape=batch_shapes(), seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_depth_l1_matches_reference(shape, seed, p_ignore):
    pred, target = depth_batch(seed, *shape, p_ignore)
    got = get_task("depth").loss(pred.double(), target.double())
    assert got.item() == pytest.approx(ref_depth_l1(pred, target), rel=1e-6, abs=1e-12)


def test_balanced_bce_is_stable_for_huge_logits():
    pred = torch.tensor([[[[200.0, -200.0], [200.0, -200.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    loss = get_task("sal").loss(pred, target)
    # Two confidently wrong pixels (one of each class) with w = 0.5: (0.5 * 200 + 0.5 * 200) / 4.
    assert torch.isfinite(loss) and loss.item() == pytest.approx(50.0)


def _all_ignored(task_name):
    b, h, w = 2, 3, 4
    if task_name in ("semseg", "human_parts"):
        c = get_task(task_name).channels
        return torch.randn(b, c, h, w), torch.full((b, h, w), IGNORE)
    c = {"sal": 1, "edge": 1, "depth": 1, "normals": 3}[task_name]
    return torch.randn(b, c, h, w), torch.full((b, c, h, w), float(IGNORE))


@pytest.mark.parametrize("task_name", ["semseg", "human_parts", "sal", "edge", "normals", "depth"])
def test_no_valid_pixel_gives_zero_and_finite_gradient(task_name):
    pred, target = _all_ignored(task_name)
    pred.requires_grad_(True)
    loss = get_task(task_name).loss(pred, target)
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


@pytest.mark.parametrize("task_name", ["semseg", "human_parts", "sal", "edge", "normals", "depth"])
def test_loss_is_differentiable(task_name, valid_batch):
    task = get_task(task_name)
    pred, target = valid_batch(task, 2, 4, 5)
    pred.requires_grad_(True)
    loss = task.loss(pred, target)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "task_name,pred_shape,target_shape",
    [
        ("semseg", (2, 21, 4, 4), (2, 5, 4)),  # spatial size differs
        ("semseg", (2, 20, 4, 4), (2, 4, 4)),  # wrong channel count
        ("normals", (2, 3, 4, 4), (2, 1, 4, 4)),  # label needs 3 channels
        ("depth", (1, 4, 4), (1, 4, 4)),  # pred not batched
    ],
)
def test_bad_shapes_raise_value_error(task_name, pred_shape, target_shape):
    task = get_task(task_name)
    target = torch.zeros(target_shape, dtype=torch.int64 if task.label_kind == "class" else torch.float32)
    with pytest.raises(ValueError):
        task.loss(torch.randn(pred_shape), target)


def test_float_class_labels_are_rejected():
    with pytest.raises(ValueError, match="integer"):
        get_task("semseg").loss(torch.randn(1, 21, 2, 2), torch.zeros(1, 2, 2))
