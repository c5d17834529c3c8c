"""Surface normals: L1 between unit vectors, angular-error statistics, RGB pictures, flip/rotate of the vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError
from .base import IGNORE, Metric, Task, check_batch, quantize_8bit
from .colors import as_tensor, check_kind

__all__ = ["Normals", "NormalsMetric", "angular_error_deg"]

_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def angular_error_deg(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between vectors along dim 1 after normalising both (float64).

    Computed as ``2 atan2(|p - l|, |p + l|)``, which equals ``acos(p · l)`` for unit vectors but stays
    accurate for tiny angles (``acos`` of a dot product near 1 loses them).
    """
    p = F.normalize(pred.double(), dim=1, eps=1e-12)
    q = F.normalize(label.double(), dim=1, eps=1e-12)
    return torch.rad2deg(2 * torch.atan2((p - q).norm(dim=1), (p + q).norm(dim=1)))


class NormalsMetric(Metric):
    """Angular error of normals pooled over every valid pixel of the dataset (degrees; thresholds in percent).

    Keys: ``mean``, ``median``, ``rmse`` and ``11.25``, ``22.5``, ``30`` (share of pixels with an angle
    below the threshold). Mean, rmse and the threshold counts are exact running sums. The median comes
    from a histogram with ``bin_deg`` wide bins over [0, 180] (the median's bin centre; when the
    pixel count is even, the mean of the two middle pixels' bin centres), so it is within half a bin
    (0.0005° by default) of the exact median, and memory does not grow with the dataset.
    """

    def __init__(self, task: Task, bin_deg: float = 0.001) -> None:
        if not (isinstance(bin_deg, (int, float)) and 0 < bin_deg <= 1):
            raise ConfigError(f"bin_deg must be in (0, 1] degrees, got {bin_deg!r}")
        self.task = task
        self.bin_deg = float(bin_deg)
        self.num_bins = int(math.ceil(180.0 / self.bin_deg))
        self.reset()

    def reset(self) -> None:
        self.histogram = torch.zeros(self.num_bins, dtype=torch.int64)
        self.count = 0
        self.sum_angle = 0.0
        self.sum_squared = 0.0
        self.below = [0] * len(_THRESHOLDS_DEG)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = check_batch(self.task, pred, target)
        valid = self.task.valid_mask(target)  # [B, H, W]
        angle = angular_error_deg(pred, target)[valid]
        bins = (angle / self.bin_deg).long().clamp_(0, self.num_bins - 1)
        self.histogram += torch.bincount(bins, minlength=self.num_bins).cpu()
        self.count += int(angle.numel())
        self.sum_angle += float(angle.sum())
        self.sum_squared += float((angle * angle).sum())
        for i, t in enumerate(_THRESHOLDS_DEG):
            self.below[i] += int((angle < t).sum())

    def _median(self) -> float:
        cumulative = torch.cumsum(self.histogram, 0)
        # 0-based ranks of the middle element(s) of the sorted angles.
        ranks = {(self.count - 1) // 2, self.count // 2}
        bins = [int(torch.searchsorted(cumulative, torch.tensor(r), right=True)) for r in ranks]
        centres = [(b + 0.5) * self.bin_deg for b in bins]
        return float(sum(centres) / len(centres))

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            nan = float("nan")
            return {"mean": nan, "median": nan, "rmse": nan, **{f"{t:g}": 0.0 for t in _THRESHOLDS_DEG}}
        result = {
            "mean": self.sum_angle / self.count,
            "median": self._median(),
            "rmse": math.sqrt(self.sum_squared / self.count),
        }
        for t, n in zip(_THRESHOLDS_DEG, self.below):
            result[f"{t:g}"] = n / self.count * 100
        return result


class Normals(Task):
    """Surface normals (label ``float32 [3, H, W]``: camera-space unit vectors, x right, y up, z towards
    the camera; 255 in all channels where undefined). The prediction is L2-normalised before use."""

    pointwise_colors = True

    name = "normals"
    title = "normals"
    label_kind = "dense"
    label_channels = 3
    default_channels = 3
    higher_is_better = {"mean": False, "median": False, "rmse": False, "11.25": True, "22.5": True, "30": True}
    primary_metric = "mean"
    headline_metrics = ("mean", "median")

    def __init__(self) -> None:
        self.channels = 3

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean |n̂ - n| over the three channels of valid pixels, n̂ the L2-normalised prediction."""
        pred, target = check_batch(self, pred, target)
        valid = self.valid_mask(target).unsqueeze(1)  # [B, 1, H, W]
        unit = F.normalize(pred, p=2, dim=1, eps=1e-12)
        label = torch.where(valid, target, torch.zeros_like(target))  # no 255 in the graph
        diff = torch.where(valid, (unit - label).abs(), torch.zeros_like(unit))
        return diff.sum() / (3 * valid.sum()).clamp_min(1)

    def new_metric(self, bin_deg: float = 0.001) -> Metric:
        """Option ``bin_deg``: histogram bin width (degrees) for the median."""
        return NormalsMetric(self, bin_deg=bin_deg)

    def decode(self, pred: torch.Tensor) -> np.ndarray:
        """Unit vectors ``float32 [3, H, W]`` (x right, y up, z to the camera): the L2-normalised output."""
        return F.normalize(pred, dim=0, eps=1e-12).numpy().astype(np.float32)

    def reference_prediction(self, pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The official evaluation's PNG read back: ``2q / 255 - 1`` with ``q`` the 8-bit
        ``255·(n̂ + 1) / 2`` map of the normalised prediction (``quantize_8bit``)."""
        unit = F.normalize(pred.double(), p=2, dim=1, eps=1e-12)
        return 2 * quantize_8bit(255 * (unit + 1) / 2, size) / 255 - 1

    def colorize(self, x, kind: str = "auto") -> np.ndarray:
        """RGB = (n + 1) / 2 · 255 of the normalised vectors; pixels with 255 in all channels black.

        Labels and predictions are drawn the same way (a label is already unit), so ``kind`` only
        checks its value.
        """
        check_kind(kind)
        x = as_tensor(x)
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"{self.name}: colorize takes a [3, H, W] map, got {tuple(x.shape)}")
        x = x.double()
        ignore = (x == IGNORE).all(dim=0)
        unit = F.normalize(x, dim=0, eps=1e-12)
        rgb = torch.round((unit + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().copy()
        rgb[ignore.numpy()] = 0
        return rgb

    # --- label hooks -------------------------------------------------------------------------

    def flip_values(self, label: torch.Tensor) -> torch.Tensor:
        """Horizontal flip: x is negated on valid pixels (ignored pixels keep 255)."""
        valid = (label != IGNORE).all(dim=-3, keepdim=True)
        out = label.clone()
        x = label[..., 0:1, :, :]
        out[..., 0:1, :, :] = torch.where(valid, -x, x)
        return out

    def resize_values(self, label: torch.Tensor) -> torch.Tensor:
        """Unit length again on valid pixels (a resample may copy or blend vectors); ignored pixels (255 in
        any channel) become 255 in all three."""
        invalid = (label == IGNORE).any(dim=-3, keepdim=True)
        length = (label * label).sum(dim=-3, keepdim=True).sqrt_().clamp_min_(1e-12)  # faster than norm()
        return torch.where(invalid, torch.full_like(label, IGNORE), label / length)

    def rotate_values(self, label: torch.Tensor, angle_deg: float) -> torch.Tensor:
        """Content rotated ``angle_deg`` counter-clockwise as displayed: (x, y) rotates CCW by the same
        angle (x right, y up): x' = x cos a - y sin a, y' = x sin a + y cos a; z and ignored pixels keep."""
        a = math.radians(angle_deg)
        cos_a, sin_a = math.cos(a), math.sin(a)
        valid = (label != IGNORE).all(dim=-3, keepdim=True)
        x, y = label[..., 0:1, :, :], label[..., 1:2, :, :]
        out = label.clone()
        out[..., 0:1, :, :] = torch.where(valid, x * cos_a - y * sin_a, x)
        out[..., 1:2, :, :] = torch.where(valid, x * sin_a + y * cos_a, y)
        return out
