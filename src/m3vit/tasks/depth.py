"""Depth: L1 on valid pixels, pooled RMSE and log-RMSE, colour-mapped pictures, depth / scale when zooming."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..utils.errors import DataError
from .base import IGNORE, Metric, Task, check_batch
from .colors import as_tensor, check_kind, colormap_image

__all__ = ["Depth", "DepthMetric"]


class DepthMetric(Metric):
    """``rmse`` = sqrt(Σ (pred - gt)² / n) and ``log_rmse`` = sqrt(Σ (log gt - log max(pred, 1e-9))² / n),
    pooled over every valid pixel of the dataset (metres)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.sum_squared = 0.0
        self.sum_log_squared = 0.0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = check_batch(self.task, pred, target)
        valid = target != IGNORE
        p = pred.double()[valid]
        gt = target.double()[valid]
        if (gt <= 0).any():
            raise DataError(f"{self.task.name}: valid depth labels must be > 0 (use {IGNORE} for unknown depth)")
        self.count += int(gt.numel())
        self.sum_squared += float(((p - gt) ** 2).sum())
        self.sum_log_squared += float(((gt.log() - p.clamp_min(1e-9).log()) ** 2).sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"rmse": float("nan"), "log_rmse": float("nan")}
        return {
            "rmse": math.sqrt(self.sum_squared / self.count),
            "log_rmse": math.sqrt(self.sum_log_squared / self.count),
        }


class Depth(Task):
    """Metric depth (label ``float32 [1, H, W]`` in metres, 255 unknown; one output channel)."""

    name = "depth"
    title = "depth"
    label_kind = "dense"
    label_channels = 1
    default_channels = 1
    higher_is_better = {"rmse": False, "log_rmse": False}
    primary_metric = "rmse"
    headline_metrics = ("rmse", "log_rmse")

    def __init__(self) -> None:
        self.channels = 1

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean |pred - label| over valid pixels (0 when there are none)."""
        pred, target = check_batch(self, pred, target)
        valid = target != IGNORE
        label = torch.where(valid, target, torch.zeros_like(target))  # no 255 in the graph
        diff = torch.where(valid, (pred - label).abs(), torch.zeros_like(pred))
        return diff.sum() / valid.sum().clamp_min(1)

    def new_metric(self) -> Metric:
        return DepthMetric(self)

    def colorize(
        self, x, kind: str = "auto", cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None
    ) -> np.ndarray:
        """``cmap`` picture over ``[vmin, vmax]`` (default: the map's valid range); pixels equal to 255 black.

        Predictions and labels are drawn alike (``kind`` is only checked).
        """
        check_kind(kind)
        x = as_tensor(x)
        if x.dim() == 3 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 2:
            raise ValueError(f"{self.name}: colorize takes a [1, H, W] or [H, W] map, got {tuple(x.shape)}")
        return colormap_image(x, x == IGNORE, cmap, vmin, vmax)

    def scale_values(self, label: torch.Tensor, scale: float) -> torch.Tensor:
        """Zooming in by ``scale`` looks like moving ``scale`` times closer: depth / scale on valid pixels."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        return torch.where(label != IGNORE, label / scale, label)
