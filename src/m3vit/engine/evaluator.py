"""Evaluation: every task scored through its own sparse pathway, on labels at their own resolution.

Two protocols (``protocol``, ``m3vit eval --protocol``): ``default`` upsamples each float prediction
bilinearly to its label; ``reference`` scores what the official M³ViT evaluation reads back from the
files it saves (``Task.reference_prediction``: class maps resized nearest, saliency and normals as
8-bit PNGs), see docs/reference.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..tasks import Task
from ..tasks.base import PROTOCOLS, resize_bilinear
from ..utils.errors import ConfigError, DataError
from .builders import build_tasks
from .inference import PATHWAYS, predict_checked

__all__ = ["evaluate", "metrics_table"]

log = logging.getLogger(__name__)


def _to_label_size(task: Task, pred: torch.Tensor, size, protocol: str) -> torch.Tensor:
    if protocol == "reference":
        return task.reference_prediction(pred, size)
    return resize_bilinear(pred, size)


@torch.no_grad()
def evaluate(model, dataset, tasks: Sequence[str] | None = None, *, batch_size: int = 8,
             size: Sequence[int] | None = None, eval_cfg: Any = None, pathway: str = "single",
             device: str | torch.device | None = None, limit: int | None = None,
             progress: bool = False, protocol: str = "default") -> dict[str, dict[str, float]]:
    """Score ``model`` on ``dataset``: ``{task: {metric: value}}``.

    Images (``[0, 1]``, untransformed) go through ``m3vit.engine.inference.predict`` (preprocessed to
    ``size``, default the model's ``img_size``, as the training ``Resize`` does); each prediction is
    upsampled (bilinear) to its label's resolution before the metric sees it. ``pathway="single"`` runs each task alone (its router, the experts it picks, its head),
    as a deployed model would; ``"all"`` runs every task in one batched forward (the results agree).
    ``eval_cfg`` is an ``EvalSection`` (metric options: ``Task.metric_options``); ``limit`` scores the
    first N samples; ``device`` is where the images go (default the model's).
    ``protocol="reference"`` scores each prediction as the official evaluation does (module docstring).
    """
    if pathway not in PATHWAYS:
        raise ConfigError(f"pathway must be {' or '.join(map(repr, PATHWAYS))}, got {pathway!r}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    tasks = model.resolve_tasks(tasks)
    missing = [t for t in tasks if t not in getattr(dataset, "tasks", ())]
    if missing:
        raise DataError(f"the dataset has no labels for task(s) {missing}; it provides {list(dataset.tasks)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (or None for the whole dataset), got {limit}")
    size = tuple(int(s) for s in (model.config.img_size if size is None else size))  # the model checks it
    task_objs: dict[str, Task] = build_tasks({t: model.config.tasks[t] for t in tasks}, dataset)
    extra = {t: task_objs[t].reference_metric_options if protocol == "reference" else {} for t in tasks}
    metrics = {t: task_objs[t].new_metric(**task_objs[t].metric_options(eval_cfg), **extra[t]) for t in tasks}
    count = len(dataset) if limit is None else min(limit, len(dataset))
    starts = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False)
    try:
        for start in starts:
            samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
            outputs = predict_checked(model, [s["image"] for s in samples], tasks, size, pathway=pathway,
                                      device=device)
            for task in tasks:
                pred = outputs[task]
                labels = [s[task] for s in samples]
                if all(label.shape[-2:] == labels[0].shape[-2:] for label in labels):
                    target = torch.stack(labels)
                    metrics[task].update(_to_label_size(task_objs[task], pred, target.shape[-2:], protocol), target)
                else:
                    for i, label in enumerate(labels):
                        one = _to_label_size(task_objs[task], pred[i:i + 1], label.shape[-2:], protocol)
                        metrics[task].update(one, label[None])
        return {t: {k: float(v) for k, v in metrics[t].compute().items()} for t in tasks}
    finally:
        for metric in metrics.values():
            close = getattr(metric, "close", None)
            if close is not None:
                close()


def _metric_text(task: str, metric: str, value: float) -> str:
    from ..tasks.registry import task_class

    arrow = "↑" if task_class(task).metric_higher_is_better(metric) else "↓"
    number = f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return f"{metric}{arrow} {number}"


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """``evaluate``'s result as text (``m3vit eval``): one row per task, its primary metric, then its other
    headline metrics (per-class IoU: JSON only)."""
    from ..tasks.registry import task_class

    rows = [["task", "main metric", "other metrics"]]
    for task, values in metrics.items():
        cls = task_class(task)
        order = [cls.primary_metric] + [m for m in cls.higher_is_better if m != cls.primary_metric]
        order += [m for m in values if m not in order and "/" not in m]
        shown = [m for m in order if m in values]
        rows.append([task, _metric_text(task, shown[0], values[shown[0]]) if shown else "-",
                     ", ".join(_metric_text(task, m, values[m]) for m in shown[1:])])
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])} | {r[1].ljust(widths[1])} | {r[2]}".rstrip() for r in rows]
    lines.insert(1, f"{'-' * widths[0]}-+-{'-' * widths[1]}-+-{'-' * max(len(r[2]) for r in rows)}")
    return "\n".join(lines)
