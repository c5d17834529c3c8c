"""Saliency: class-balanced BCE on logits, max F-measure and max mIoU over 15 thresholds, grey pictures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError
from .base import IGNORE, Metric, Task, check_batch, quantize_8bit
from .colors import as_tensor, check_kind, gray_image

__all__ = ["Saliency", "SaliencyMetric", "balanced_bce_with_logits", "binary_map_for_picture", "sigmoid_probability"]


def balanced_bce_with_logits(pred: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy (HED style) of logits ``pred`` against 0/1 labels with 255 ignored.

    Positives are valid pixels with ``target >= 0.5``. Positive pixels are weighted by ``w`` and
    negatives by ``1 - w``, where ``w`` is ``pos_weight`` or, when None, the share of negatives among
    the batch's valid pixels. The weighted sum is divided by the number of valid pixels (the reference
    divides by all pixels; the two agree when nothing is ignored). 0 when no pixel is valid.
    """
    valid = target != IGNORE
    positive = valid & (target >= 0.5)
    negative = valid & ~positive
    num_valid = valid.sum()
    if pos_weight is None:
        w = negative.sum().to(pred.dtype) / num_valid.clamp_min(1).to(pred.dtype)
    else:
        w = torch.as_tensor(pos_weight, dtype=pred.dtype, device=pred.device)
    # -log(sigmoid(x)) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x): stable for large |x|.
    loss_pos = torch.where(positive, F.softplus(-pred), torch.zeros_like(pred)).sum()
    loss_neg = torch.where(negative, F.softplus(pred), torch.zeros_like(pred)).sum()
    return (w * loss_pos + (1 - w) * loss_neg) / num_valid.clamp_min(1)


def binary_map_for_picture(task: Task, x, kind: str) -> np.ndarray:
    """Grey picture of a one-channel binary task: label (0/1, 255 black) or logits (sigmoid probability).

    ``kind="auto"`` treats a map holding only the values 0, 1 and 255 as a label, anything else as logits.
    """
    x = as_tensor(x)
    kind = check_kind(kind)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"{task.name}: colorize takes a [1, H, W] or [H, W] map, got {tuple(x.shape)}")
    x = x.double()
    if kind == "auto":
        is_label = bool(((x == 0) | (x == 1) | (x == IGNORE)).all())
        kind = "label" if is_label else "pred"
    if kind == "label":
        ignore = x == IGNORE
        return gray_image(torch.where(ignore, torch.zeros_like(x), x), ignore)
    return gray_image(torch.sigmoid(x), torch.zeros_like(x, dtype=torch.bool))


def sigmoid_probability(pred: torch.Tensor) -> np.ndarray:
    """Probability ``float32 [H, W]`` of a one-channel logit map ``[1, H, W]`` (the sigmoid)."""
    return torch.sigmoid(pred[0]).numpy().astype(np.float32)


class SaliencyMetric(Metric):
    """``maxF`` and ``mIoU`` (percent) of saliency over a dataset, per the field's protocol.

    For each image and threshold ``t``: predicted = p > t with p = sigmoid(logit) (``inputs="logits"``)
    or the prediction itself (``inputs="probabilities"``, e.g. the official 8-bit maps q / 255),
    ground truth = label > 0.5, ignored pixels excluded; precision = tp / (tp + fp + 1e-12), recall = tp / (tp + fn + 1e-12),
    IoU = |pred ∩ gt| / |pred ∪ gt| (1 when both are empty). Precision, recall and IoU are averaged
    over images per threshold; F_t = (1 + β²) P R / (β² P + R); ``maxF`` = max_t F_t and ``mIoU`` =
    max_t of the mean IoU.
    """

    def __init__(self, task: Task, thresholds: Sequence[float] | None = None, beta2: float = 0.3,
                 inputs: str = "logits") -> None:
        if inputs not in ("logits", "probabilities"):
            raise ValueError(f"inputs must be 'logits' or 'probabilities', got {inputs!r}")
        self.task = task
        self.inputs = inputs
        thresholds = np.linspace(0.2, 0.9, 15) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if thresholds.ndim != 1 or thresholds.size == 0 or ((thresholds < 0) | (thresholds > 1)).any():
            raise ConfigError(f"thresholds must be a non-empty list of values in [0, 1], got {thresholds!r}")
        if not beta2 > 0:
            raise ConfigError(f"beta2 must be > 0, got {beta2!r}")
        self.thresholds = thresholds
        self.beta2 = float(beta2)
        self.reset()

    def reset(self) -> None:
        n = len(self.thresholds)
        self.sum_precision = np.zeros(n)
        self.sum_recall = np.zeros(n)
        self.sum_iou = np.zeros(n)
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = check_batch(self.task, pred, target)
        thresholds = torch.as_tensor(self.thresholds, dtype=torch.float64, device=pred.device)
        prob = pred[:, 0].double()
        if self.inputs == "logits":
            prob = torch.sigmoid(prob)
        label = target[:, 0]
        for b in range(pred.shape[0]):
            valid = label[b] != IGNORE
            gt = label[b][valid] > 0.5  # [n]
            predicted = prob[b][valid][None, :] > thresholds[:, None]  # [T, n]
            tp = (predicted & gt).sum(dim=1).double()
            fp = (predicted & ~gt).sum(dim=1).double()
            fn = (~predicted & gt).sum(dim=1).double()
            union = tp + fp + fn
            iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(union))
            self.sum_precision += (tp / (tp + fp + 1e-12)).cpu().numpy()
            self.sum_recall += (tp / (tp + fn + 1e-12)).cpu().numpy()
            self.sum_iou += iou.cpu().numpy()
        self.num_images += pred.shape[0]

    def compute(self) -> dict[str, float]:
        if self.num_images == 0:
            return {"maxF": 0.0, "mIoU": 0.0}
        precision = self.sum_precision / self.num_images
        recall = self.sum_recall / self.num_images
        denominator = self.beta2 * precision + recall
        safe = np.where(denominator > 0, denominator, 1.0)
        f = np.where(denominator > 0, (1 + self.beta2) * precision * recall / safe, 0.0)
        return {"maxF": float(f.max() * 100), "mIoU": float((self.sum_iou / self.num_images).max() * 100)}


class Saliency(Task):
    """Salient-object segmentation (label ``float32 [1, H, W]``: 0/1, 255 ignored; one logit channel)."""

    pointwise_colors = True

    name = "sal"
    title = "saliency"
    label_kind = "dense"
    label_channels = 1
    default_channels = 1
    higher_is_better = {"maxF": True, "mIoU": True}
    primary_metric = "mIoU"  # the M³ViT paper reports saliency as mIoU
    headline_metrics = ("maxF", "mIoU")
    reference_metric_options = {"inputs": "probabilities"}

    def __init__(self) -> None:
        self.channels = 1

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = check_batch(self, pred, target)
        return balanced_bce_with_logits(pred, target)

    def new_metric(self, thresholds: Sequence[float] | None = None, beta2: float = 0.3,
                   inputs: str = "logits") -> Metric:
        """Options: ``thresholds`` (default 15 from 0.2 to 0.9), ``beta2`` of the F-measure (default 0.3),
        ``inputs`` (``logits`` or ``probabilities``)."""
        return SaliencyMetric(self, thresholds=thresholds, beta2=beta2, inputs=inputs)

    def decode(self, pred: torch.Tensor) -> np.ndarray:
        """Saliency probability ``float32 [H, W]``: the sigmoid of the logit."""
        return sigmoid_probability(pred)

    def reference_prediction(self, pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The official evaluation's PNG read back: ``q / 255`` with ``q`` the 8-bit ``255·sigmoid`` map
        (``quantize_8bit``); probabilities, for ``new_metric(inputs="probabilities")``."""
        return quantize_8bit(255 * torch.sigmoid(pred.double()), size) / 255

    def colorize(self, x, kind: str = "auto") -> np.ndarray:
        """Grey picture: sigmoid probability of logits, or the 0/1 label (ignored pixels black)."""
        return binary_map_for_picture(self, x, kind)
