"""Dataset metrics of semseg, human parts, saliency, normals and depth against independent NumPy loops."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.tasks import IGNORE, get_task

SETTINGS = settings(max_examples=20, deadline=None)


def _split_update(metric, pred, target, sizes):
    start = 0
    for size in sizes:
        metric.update(pred[start:start + size], target[start:start + size])
        start += size
    assert start == pred.shape[0]
    return metric.compute()


# --- segmentation --------------------------------------------------------------------------


def ref_segmentation(pred, target, num_classes, skip_without_foreground=False):
    """Confusion counts with plain loops; IoU over classes seen in labels or predictions."""
    pred = pred.double().numpy()
    target = target.numpy()
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    correct = total = 0
    for i in range(pred.shape[0]):
        labels = target[i]
        if skip_without_foreground and not any(0 < v < IGNORE for v in labels.flatten().tolist()):
            continue
        for y in range(labels.shape[0]):
            for x in range(labels.shape[1]):
                label = int(labels[y, x])
                if label == IGNORE:
                    continue
                guess = int(np.argmax(pred[i, :, y, x]))
                total += 1
                if guess == label:
                    tp[label] += 1
                    correct += 1
                else:
                    fp[guess] += 1
                    fn[label] += 1
    ious = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c] > 0}
    return {"mIoU": 100 * sum(ious.values()) / len(ious), "pixel_acc": 100 * correct / total, "per_class": ious}


def seg_batch(seed, b, h, w, c, p_ignore, max_label=None):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, max_label or c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < p_ignore] = IGNORE
    return pred, target


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6),
       p_ignore=st.sampled_from([0.0, 0.2, 0.6]), max_label=st.sampled_from([None, 3]))
def test_semseg_metric_matches_reference(seed, b, h, w, p_ignore, max_label):
    num_classes = 5
    pred, target = seg_batch(seed, b, h, w, num_classes, p_ignore, max_label)
    if (target == IGNORE).all():
        target[0, 0, 0] = 0
    names = ["bg", "cat", "dog", "car", "sky"]
    metric = get_task("semseg", num_classes=num_classes, class_names=names).new_metric()
    metric.update(pred, target)
    got = metric.compute()
    ref = ref_segmentation(pred, target, num_classes)
    assert got["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert got["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-9)
    per_class = {k[len("IoU/"):]: v for k, v in got.items() if k.startswith("IoU/")}
    assert per_class == pytest.approx({names[c]: 100 * v for c, v in ref["per_class"].items()})


def test_semseg_absent_classes_are_excluded():
    # Two classes of four ever appear, both predicted perfectly: mIoU 100, not 50.
    pred = torch.zeros(1, 4, 2, 2)
    target = torch.tensor([[[0, 2], [2, 0]]])
    pred[0, 0] = (target[0] == 0).float()
    pred[0, 2] = (target[0] == 2).float()
    metric = get_task("semseg", num_classes=4).new_metric()
    metric.update(pred, target)
    result = metric.compute()
    assert result["mIoU"] == 100.0
    assert set(k for k in result if k.startswith("IoU/")) == {"IoU/0", "IoU/2"}


def test_semseg_accumulates_over_batches_like_one_batch():
    pred, target = seg_batch(3, 7, 5, 6, 6, 0.2)
    task = get_task("semseg", num_classes=6)
    one = task.new_metric()
    one.update(pred, target)
    many = task.new_metric()
    assert _split_update(many, pred, target, [2, 1, 4]) == one.compute()
    many.reset()
    many.update(pred[:1], target[:1])
    many.reset()
    assert _split_update(many, pred, target, [7]) == one.compute()


def test_semseg_rejects_labels_out_of_range():
    metric = get_task("semseg", num_classes=3).new_metric()
    with pytest.raises(ValueError, match="class id"):
        metric.update(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 3]]]))


def test_human_parts_skips_images_without_parts():
    num_classes = 7
    pred, target = seg_batch(11, 5, 4, 5, num_classes, 0.1)
    target[1] = torch.where(target[1] == IGNORE, target[1], torch.zeros_like(target[1]))  # background only
    target[3] = IGNORE  # nothing labelled
    metric = get_task("human_parts").new_metric()
    got = _split_update(metric, pred, target, [2, 3])
    ref = ref_segmentation(pred, target, num_classes, skip_without_foreground=True)
    assert got["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert got["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-9)
    assert "IoU/head" in got or "IoU/torso" in got
    # Skipping changes the result here: the background-only image has mispredicted pixels.
    assert got["mIoU"] != pytest.approx(ref_segmentation(pred, target, num_classes)["mIoU"], abs=1e-9)


# --- saliency ----------------------------------------------------------------------------


def ref_saliency(pred, target, beta2=0.3):
    thresholds = np.linspace(0.2, 0.9, 15)
    precisions, recalls, ious = [], [], []
    for i in range(pred.shape[0]):
        prob = [1 / (1 + math.exp(-float(v))) for v in pred[i, 0].flatten().tolist()]
        labels = target[i, 0].flatten().tolist()
        rows_p, rows_r, rows_j = [], [], []
        for t in thresholds:
            tp = fp = fn = 0
            for p, label in zip(prob, labels):
                if label == IGNORE:
                    continue
                gt, hit = label > 0.5, p > t
                tp += gt and hit
                fp += hit and not gt
                fn += gt and not hit
            rows_p.append(tp / (tp + fp + 1e-12))
            rows_r.append(tp / (tp + fn + 1e-12))
            rows_j.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
        precisions.append(rows_p)
        recalls.append(rows_r)
        ious.append(rows_j)
    mean_p, mean_r, mean_j = (np.mean(np.array(x), axis=0) for x in (precisions, recalls, ious))
    f = [(1 + beta2) * p * r / (beta2 * p + r) if beta2 * p + r > 0 else 0.0 for p, r in zip(mean_p, mean_r)]
    return {"maxF": 100 * max(f), "mIoU": 100 * max(mean_j)}


def sal_batch(seed, b, h, w, p_ignore):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(b, 1, h, w, generator=g) < 0.4).float()
    pred = (target * 2 - 1) * 1.5 + torch.randn(b, 1, h, w, generator=g) * 1.5  # informative logits
    target[torch.rand(b, 1, h, w, generator=g) < p_ignore] = IGNORE
    return pred, target


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_saliency_metric_matches_reference(seed, b, h, w, p_ignore):
    pred, target = sal_batch(seed, b, h, w, p_ignore)
    metric = get_task("sal").new_metric()
    metric.update(pred, target)
    got = metric.compute()
    ref = ref_saliency(pred, target)
    assert got["maxF"] == pytest.approx(ref["maxF"], abs=1e-7)
    assert got["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-7)


def test_saliency_accumulates_and_empty_gt_counts_as_perfect_iou():
    pred, target = sal_batch(5, 6, 5, 5, 0.2)
    pred[2] = -20.0  # nothing predicted ...
    target[2] = torch.where(target[2] == IGNORE, target[2], torch.zeros_like(target[2]))  # ... nothing salient
    task = get_task("sal")
    one = task.new_metric()
    one.update(pred, target)
    many = task.new_metric()
    got = _split_update(many, pred, target, [1, 2, 3])
    assert got == pytest.approx(one.compute(), abs=1e-9)
    assert got == pytest.approx(ref_saliency(pred, target), abs=1e-7)


# --- normals -----------------------------------------------------------------------------


def normals_batch(seed, b, h, w, p_ignore):
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    pred = (target + 0.6 * torch.randn(b, 3, h, w, generator=g)) * 3.0  # unnormalised, near the label
    target.permute(0, 2, 3, 1)[torch.rand(b, h, w, generator=g) < p_ignore] = IGNORE
    return pred, target


def ref_normals(pred, target):
    angles = []
    p_np, t_np = pred.double().numpy(), target.double().numpy()
    for i in range(p_np.shape[0]):
        for y in range(p_np.shape[2]):
            for x in range(p_np.shape[3]):
                label = t_np[i, :, y, x]
                if (label == IGNORE).all():
                    continue
                p = p_np[i, :, y, x] / np.linalg.norm(p_np[i, :, y, x])
                dot = float(np.clip(np.dot(p, label / np.linalg.norm(label)), -1, 1))
                angles.append(math.degrees(math.acos(dot)))
    a = np.array(angles)
    return {
        "mean": a.mean(), "median": np.median(a), "rmse": math.sqrt((a**2).mean()),
        "11.25": 100 * (a < 11.25).mean(), "22.5": 100 * (a < 22.5).mean(), "30": 100 * (a < 30).mean(),
    }


@pytest.mark.parametrize("seed,bin_deg", [(0, 0.001), (1, 0.001), (2, 0.5)])
def test_normals_metric_matches_reference(seed, bin_deg):
    pred, target = normals_batch(seed, 3, 6, 7, 0.25)
    metric = get_task("normals").new_metric(bin_deg=bin_deg)
    got = _split_update(metric, pred, target, [1, 2])
    ref = ref_normals(pred, target)
    for key in ("mean", "rmse", "11.25", "22.5", "30"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert abs(got["median"] - ref["median"]) <= bin_deg / 2 + 1e-9


@pytest.mark.parametrize("count", [1, 2, 5, 6])
def test_normals_median_within_half_bin_for_odd_and_even_counts(count):
    pred, target = normals_batch(7, 1, 1, count, 0.0)
    metric = get_task("normals").new_metric(bin_deg=0.25)
    metric.update(pred, target)
    assert abs(metric.compute()["median"] - ref_normals(pred, target)["median"]) <= 0.125 + 1e-9


def test_normals_exact_prediction_has_zero_error():
    _, target = normals_batch(3, 2, 4, 4, 0.3)
    pred = torch.where(target == IGNORE, torch.ones_like(target), target * 7.0)
    metric = get_task("normals").new_metric()
    metric.update(pred, target)
    result = metric.compute()
    assert result["mean"] < 1e-5 and result["rmse"] < 1e-5 and result["30"] == 100.0


# --- depth -------------------------------------------------------------------------------


def test_depth_metric_matches_reference_and_accumulates():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(5, 1, 4, 6, generator=g) * 4 + 0.5
    target[torch.rand(5, 1, 4, 6, generator=g) < 0.3] = IGNORE
    pred = target + torch.randn(5, 1, 4, 6, generator=g) * 0.5
    pred[0, 0, 0, 0] = -1.0  # non-positive prediction: log clamps it at 1e-9
    target[0, 0, 0, 0] = 2.0
    sq, log_sq, n = 0.0, 0.0, 0
    for p, t in zip(pred.double().flatten().tolist(), target.double().flatten().tolist()):
        if t == IGNORE:
            continue
        sq += (p - t) ** 2
        log_sq += (math.log(t) - math.log(max(p, 1e-9))) ** 2
        n += 1
    metric = get_task("depth").new_metric()
    got = _split_update(metric, pred, target, [3, 2])
    assert got["rmse"] == pytest.approx(math.sqrt(sq / n), rel=1e-9)
    assert got["log_rmse"] == pytest.approx(math.sqrt(log_sq / n), rel=1e-9)


def test_depth_metric_rejects_non_positive_labels():
    with pytest.raises(ValueError, match="> 0"):
        get_task("depth").new_metric().update(torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 0.0]]]]))


# --- common ------------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", ["semseg", "human_parts", "sal", "normals", "depth", "edge"])
def test_metric_keys_have_a_direction_and_primary_metric_is_reported(task_name, valid_batch):
    task = get_task(task_name)
    assert task.primary_metric in task.higher_is_better
    pred, target = valid_batch(task, 1, 5, 5)
    metric = task.new_metric()
    metric.update(pred, target)
    result = metric.compute()
    assert task.primary_metric in result
    for key in result:
        assert isinstance(task.metric_higher_is_better(key), bool)
