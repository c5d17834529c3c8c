"""Semantic segmentation: cross-entropy ignoring 255, dataset confusion-matrix mIoU, VOC palette."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError, DataError
from .base import IGNORE, Metric, Task, check_batch, check_positive_int
from .colors import as_tensor, check_kind, label_image, voc_palette

__all__ = ["SemSeg", "ConfusionMatrixMetric", "masked_cross_entropy"]


def masked_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels whose label is not ``IGNORE``; 0 (with a zero gradient) when there are none."""
    total = F.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum")
    num_valid = (target != IGNORE).sum()
    return total / num_valid.clamp_min(1)


class ConfusionMatrixMetric(Metric):
    """Dataset confusion matrix of argmax predictions; ``mIoU``, ``pixel_acc`` and ``IoU/<class>`` in percent.

    IoU of a class is TP / (TP + FP + FN) over the whole dataset; classes with TP + FP + FN = 0
    (absent from both labels and predictions) are left out of the mean and get no ``IoU/`` key.
    With ``skip_without_foreground`` an image whose label has no pixel of a class >= 1 is skipped
    (the human-parts protocol: only images showing people count).
    """

    def __init__(self, task: Task, class_names: Sequence[str], skip_without_foreground: bool = False) -> None:
        self.task = task
        self.num_classes = len(class_names)
        self.class_names = list(class_names)
        self.skip_without_foreground = skip_without_foreground
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # [label, pred]
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = check_batch(self.task, pred, target)
        valid = target != IGNORE
        out_of_range = valid & ((target < 0) | (target >= self.num_classes))
        if out_of_range.any():
            raise DataError(
                f"{self.task.name}: label value {int(target[out_of_range][0])} is neither a class id "
                f"0..{self.num_classes - 1} nor {IGNORE}"
            )
        if self.skip_without_foreground:
            has_foreground = (valid & (target > 0)).flatten(1).any(dim=1)
            valid = valid & has_foreground[:, None, None]
            self.num_images += int(has_foreground.sum())
        else:
            self.num_images += target.shape[0]
        predicted = pred.argmax(dim=1)
        pairs = target[valid] * self.num_classes + predicted[valid]
        counts = torch.bincount(pairs, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict[str, float]:
        conf = self.confusion.double()
        tp = conf.diag()
        fp = conf.sum(dim=0) - tp
        fn = conf.sum(dim=1) - tp
        union = tp + fp + fn
        present = union > 0
        iou = tp / union.clamp_min(1)
        total = conf.sum()
        result = {
            "mIoU": float(iou[present].mean() * 100) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total * 100) if total > 0 else 0.0,
        }
        for c in torch.nonzero(present).flatten().tolist():
            result[f"IoU/{self.class_names[c]}"] = float(iou[c] * 100)
        return result


class SemSeg(Task):
    """Semantic segmentation with ``num_classes`` classes (label ``int64 [H, W]``, 255 ignored).

    Options: ``num_classes`` (default 21: PASCAL VOC 20 + background), ``class_names`` (default the
    ids as strings; used for the per-class ``IoU/<name>`` metrics).
    """

    pointwise_colors = True

    name = "semseg"
    title = "semseg"
    label_kind = "class"
    default_channels = 21
    higher_is_better = {"mIoU": True, "pixel_acc": True}
    primary_metric = "mIoU"
    headline_metrics = ("mIoU",)
    _skip_without_foreground = False
    #: The dataset attribute listing this task's class names, in id order (``m3vit.data.show.dataset_tasks``).
    class_names_attribute = "classes"

    def __init__(self, num_classes: int = default_channels, class_names: Sequence[str] | None = None) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        if num_classes >= IGNORE:
            raise ConfigError(f"num_classes must be < {IGNORE} (the ignore label), got {num_classes}")
        if class_names is None:
            class_names = [str(c) for c in range(num_classes)]
        elif isinstance(class_names, str) or len(class_names) != num_classes:
            raise ConfigError(f"class_names must list {num_classes} names (num_classes), got {class_names!r}")
        self.class_names = [str(n) for n in class_names]
        self.channels = num_classes

    @classmethod
    def metric_higher_is_better(cls, metric: str) -> bool:
        if metric.startswith("IoU/"):
            return True
        return super().metric_higher_is_better(metric)

    def palette(self) -> np.ndarray:
        return voc_palette(self.num_classes)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = check_batch(self, pred, target)
        return masked_cross_entropy(pred, target)

    def new_metric(self) -> Metric:
        return ConfusionMatrixMetric(self, self.class_names, skip_without_foreground=self._skip_without_foreground)

    def decode(self, pred: torch.Tensor) -> np.ndarray:
        """Class ids ``uint8 [H, W]``: the argmax of the logits ``[C, H, W]``."""
        return pred.argmax(dim=0).numpy().astype(np.uint8)

    def reference_prediction(self, pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The official evaluation's label file: the argmax at the network's resolution resized
        nearest-neighbour (OpenCV ``INTER_NEAREST``: source pixel ``floor(i * in / out)``), as one-hot scores."""
        labels = pred.argmax(dim=1, keepdim=True).float()
        if tuple(labels.shape[-2:]) != tuple(size):
            labels = F.interpolate(labels, size=tuple(int(s) for s in size), mode="nearest")
        return F.one_hot(labels[:, 0].long(), pred.shape[1]).permute(0, 3, 1, 2).to(pred.dtype)

    def colorize(self, x, kind: str = "auto") -> np.ndarray:
        """Palette picture of a label ``[H, W]`` (integer) or of raw logits ``[C, H, W]`` (float, argmax).

        ``kind="auto"`` treats floating-point input as logits and integer input as a label.
        """
        x = as_tensor(x)
        kind = check_kind(kind)
        if kind == "auto":
            kind = "pred" if x.is_floating_point() else "label"
        if kind == "pred":
            if x.dim() != 3 or x.shape[0] != self.channels:
                raise ValueError(f"{self.name}: a prediction must be [{self.channels}, H, W], got {tuple(x.shape)}")
            ids = x.argmax(dim=0)
            ignore = torch.zeros_like(ids, dtype=torch.bool)
        else:
            if x.dim() == 3 and x.shape[0] == 1:
                x = x[0]
            if x.dim() != 2:
                raise ValueError(f"{self.name}: a label must be [H, W], got {tuple(x.shape)}")
            ids = x.long()
            ignore = ids == IGNORE
        return label_image(ids, self.palette(), ignore)
