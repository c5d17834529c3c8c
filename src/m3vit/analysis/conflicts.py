"""Gradient conflicts between tasks: cosines of the per-task loss gradients on the shared backbone.

M³ViT's motivation is that tasks pull a shared backbone in conflicting directions and that task-routed
experts separate them. ``task_gradient_cosines`` measures it: for each task ``t`` alone,
``g_t = ∇_θ L_t(model(images, tasks=[t])[t], targets[t])`` over every parameter ``θ`` of
``model.backbone`` that requires grad (flattened and concatenated; a parameter a task's pathway does not
reach contributes zeros), and for every pair ``cos(g_a, g_b) = <g_a, g_b> / (|g_a| |g_b|)``, computed in
float64. A pair conflicts when its cosine is negative (PCGrad's definition, Yu et al. 2020).

``gradient_conflicts`` returns the same cosines with the per-group ones (``embed``: patch embedding,
class token and positional embedding; ``block<i>``: each transformer block; ``other``: anything else in
the backbone) and the gradient norms. A cosine involving a zero gradient (a task whose loss does not
depend on the group, or has no valid pixel) is undefined: NaN here, ``null`` in JSON, and left out of
means and conflict fractions. ``measure_conflicts`` runs it over validation batches.

Nothing of the caller's is changed: gradients are taken with ``torch.autograd.grad`` (``.grad`` is
untouched), the model keeps its train/eval mode, and buffers a training-mode forward updates (batch-norm
running statistics) are restored afterwards. The MoE balance loss is not part of a task's loss.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import preprocess
from ..data.transforms import Resize
from ..engine.builders import build_tasks
from ..tasks import get_task
from ..utils.errors import DataError, InputError

__all__ = ["task_gradient_cosines", "gradient_conflicts", "GradientConflicts", "ConflictReport",
           "measure_conflicts", "parameter_groups", "plot_conflict_matrices", "plot_conflict_evolution",
           "pair_key", "pair_label"]

log = logging.getLogger(__name__)


def pair_key(a: str, b: str) -> str:
    """The dictionary key of a task pair: ``"a|b"``."""
    return f"{a}|{b}"


def pair_label(key: str) -> str:
    """A task pair as tables show it (``"a × b"``: a bar would split a Markdown table cell)."""
    return key.replace("|", " × ")


def parameter_groups(model) -> list[tuple[str, list[str]]]:
    """``[(group, [parameter names])]`` of ``model.backbone``'s trainable parameters, in model order:
    ``embed`` (patch embedding, class token, positional embedding), ``block<i>`` per block, ``other``."""
    groups: dict[str, list[str]] = {}
    for name, param in model.backbone.named_parameters():
        if not param.requires_grad:
            continue
        head = name.split(".", 2)
        if head[0] == "blocks" and len(head) > 1 and head[1].isdigit():
            group = f"block{head[1]}"
        elif head[0] in ("patch_embed", "cls_token", "pos_embed"):
            group = "embed"
        else:
            group = "other"
        groups.setdefault(group, []).append(name)
    order = ["embed"] + sorted((g for g in groups if g.startswith("block")), key=lambda g: int(g[5:])) + ["other"]
    return [(g, groups[g]) for g in order if g in groups]


def _loss_tasks(model, tasks: Sequence[str]) -> dict:
    """The task objects whose ``loss`` is each task's loss: ``get_task(t)`` when its channels match the
    model's head, else one sized to the head (``build_tasks``)."""
    out = {}
    for task in tasks:
        default = get_task(task)
        channels = model.config.tasks[task]
        out[task] = default if getattr(default, "channels", channels) == channels else build_tasks({task: channels})[task]
    return out


@dataclass
class GradientConflicts:
    """Per-task backbone gradients of one batch, compared: ``cosine[a, b]`` over the whole backbone,
    ``group_cosine[g, a, b]`` within ``groups[g]``, ``norm[t]`` and ``group_norm[g, t]`` (L2)."""

    tasks: list[str]
    groups: list[str]
    cosine: np.ndarray  # [T, T] float64, NaN where undefined
    group_cosine: np.ndarray  # [G, T, T]
    norm: np.ndarray  # [T]
    group_norm: np.ndarray  # [G, T]

    def pairs(self) -> dict[str, float]:
        """``{"a|b": cosine}`` for each pair of tasks (``a`` before ``b`` in task order)."""
        return {pair_key(self.tasks[i], self.tasks[j]): float(self.cosine[i, j])
                for i, j in combinations(range(len(self.tasks)), 2)}

    def group_pairs(self) -> dict[str, dict[str, float]]:
        """``{group: {"a|b": cosine}}``."""
        return {g: {pair_key(self.tasks[i], self.tasks[j]): float(self.group_cosine[k, i, j])
                    for i, j in combinations(range(len(self.tasks)), 2)}
                for k, g in enumerate(self.groups)}

    @property
    def conflict_fraction(self) -> float:
        """Share of the task pairs with a defined cosine below 0 (NaN with no defined pair)."""
        values = np.array(list(self.pairs().values()), dtype=np.float64)
        values = values[~np.isnan(values)]
        return float((values < 0).mean()) if values.size else math.nan


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """``[T, T]`` float64 inner products of same-length flat vectors."""
    stacked = torch.stack([v.double() for v in vectors])
    return stacked @ stacked.t()


def _cosines(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))
    denominator = np.outer(norms, norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(denominator > 0, gram / np.where(denominator > 0, denominator, 1.0), np.nan)
    return np.clip(cosine, -1.0, 1.0), norms


def gradient_conflicts(model, images: torch.Tensor, targets: Mapping[str, torch.Tensor],
                       tasks: Sequence[str] | None = None) -> GradientConflicts:
    """Cosines between the tasks' backbone gradients on one batch, overall and per parameter group
    (see the module docstring). ``images`` are what the model takes (normalised ``[B, 3, H, W]``),
    ``targets[t]`` labels in the task's format at the prediction's size; ``tasks`` default to the model's,
    in the model's task order either way."""
    requested = model.resolve_tasks(tasks)
    tasks = [t for t in model.tasks if t in requested]
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise ValueError(f"targets hold no labels for task(s) {missing}; they have {sorted(targets)}")
    named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the backbone has no parameter that requires grad: there is no gradient to compare")
    params = [p for _, p in named]
    index = {n: i for i, (n, _) in enumerate(named)}
    groups = parameter_groups(model)
    loss_tasks = _loss_tasks(model, tasks)
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if model.training else {}
    grads: list[list[torch.Tensor]] = []
    try:
        with torch.enable_grad():
            for task in tasks:
                pred = model(images, tasks=[task])[task]
                if pred.dtype in (torch.float16, torch.bfloat16):
                    pred = pred.float()
                loss = loss_tasks[task].loss(pred, targets[task].to(pred.device))
                if loss.requires_grad:
                    found = torch.autograd.grad(loss, params, allow_unused=True)
                else:  # no valid pixel: the loss is a constant
                    found = [None] * len(params)
                grads.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(found, params)])
    finally:
        if saved_buffers:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved_buffers:
                        buffer.copy_(saved_buffers[name])
    num_tasks = len(tasks)
    group_grams = np.zeros((len(groups), num_tasks, num_tasks))
    for k, (_, names) in enumerate(groups):
        flat = [torch.cat([grads[t][index[n]].reshape(-1) for n in names]) for t in range(num_tasks)]
        group_grams[k] = _gram(flat).cpu().numpy()
    cosine, norm = _cosines(group_grams.sum(0))
    group_cosine = np.zeros_like(group_grams)
    group_norm = np.zeros((len(groups), num_tasks))
    for k in range(len(groups)):
        group_cosine[k], group_norm[k] = _cosines(group_grams[k])
    return GradientConflicts(tasks=tasks, groups=[g for g, _ in groups], cosine=cosine, group_cosine=group_cosine,
                             norm=norm, group_norm=group_norm)


def task_gradient_cosines(model, images: torch.Tensor, targets: Mapping[str, torch.Tensor],
                          tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``{"a|b": cos(g_a, g_b)}`` for each pair of tasks in the model's task order, ``g_t`` the gradient
    of task ``t``'s loss (``m3vit.tasks.get_task(t).loss(model(images, tasks=[t])[t], targets[t])``) with
    respect to every trainable parameter of ``model.backbone``. NaN where a gradient is zero. The
    model's mode, its ``.grad`` fields and its buffers are left as they were. See ``gradient_conflicts``
    for the per-block cosines and the conflict fraction."""
    return gradient_conflicts(model, images, targets, tasks).pairs()


# ----------------------------------------------------------------------------------------------
# Over a dataset
# ----------------------------------------------------------------------------------------------
def _nan_stats(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (n - 1) along ``axis`` ignoring NaN (NaN when no / one value)."""
    valid = ~np.isnan(values)
    count = valid.sum(axis)
    filled = np.where(valid, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, filled.sum(axis) / np.maximum(count, 1), np.nan)
        centred = np.where(valid, values - np.expand_dims(mean, axis), 0.0)
        std = np.where(count > 1, np.sqrt((centred ** 2).sum(axis) / np.maximum(count - 1, 1)), np.nan)
    return mean, std


@dataclass
class ConflictReport:
    """Gradient conflicts of a model over several batches (``batches``, one ``GradientConflicts`` each).

    ``mean_cosine``/``std_cosine`` ``[T, T]``: mean and sample std over the batches of each pair's
    cosine; ``conflict_rate`` ``[T, T]``: share of the batches where the pair conflicts;
    ``conflict_fraction``: share of all (pair, batch) cosines below 0; ``group_mean_cosine`` ``[G, T, T]``.
    """

    tasks: list[str]
    groups: list[str]
    batches: list[GradientConflicts]
    num_images: int
    info: dict[str, Any] = field(default_factory=dict)

    def _stack(self, attr: str) -> np.ndarray:
        return np.stack([getattr(b, attr) for b in self.batches])

    @property
    def mean_cosine(self) -> np.ndarray:
        return _nan_stats(self._stack("cosine"))[0]

    @property
    def std_cosine(self) -> np.ndarray:
        return _nan_stats(self._stack("cosine"))[1]

    @property
    def group_mean_cosine(self) -> np.ndarray:
        return _nan_stats(self._stack("group_cosine"))[0]

    @property
    def conflict_rate(self) -> np.ndarray:
        cos = self._stack("cosine")
        valid = ~np.isnan(cos)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(valid.sum(0) > 0, ((cos < 0) & valid).sum(0) / np.maximum(valid.sum(0), 1), np.nan)

    def _pair_values(self, matrix: np.ndarray) -> list[float]:
        return [float(matrix[i, j]) for i, j in combinations(range(len(self.tasks)), 2)]

    @property
    def conflict_fraction(self) -> float:
        values = np.array([v for b in self.batches for v in b.pairs().values()], dtype=np.float64)
        values = values[~np.isnan(values)]
        return float((values < 0).mean()) if values.size else math.nan

    @property
    def mean_pair_cosine(self) -> float:
        """Mean over the task pairs of ``mean_cosine`` (NaN with fewer than two tasks)."""
        values = np.array(self._pair_values(self.mean_cosine))
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else math.nan

    def pairs(self) -> dict[str, float]:
        """``{"a|b": mean cosine over the batches}``."""
        return {pair_key(self.tasks[i], self.tasks[j]): float(self.mean_cosine[i, j])
                for i, j in combinations(range(len(self.tasks)), 2)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as ``null``): matrices, per-pair and per-group means, conflict fractions."""
        def clean(x):
            if isinstance(x, np.ndarray):
                return clean(x.tolist())
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return None if isinstance(x, float) and math.isnan(x) else x

        group_mean = self.group_mean_cosine
        return clean({
            **self.info,
            "tasks": list(self.tasks),
            "num_batches": len(self.batches),
            "num_images": self.num_images,
            "definition": "cosine between two tasks' loss gradients w.r.t. the backbone parameters, each task run "
                          "alone through its own pathway; a pair conflicts when its cosine is < 0 (PCGrad)",
            "cosine": self.mean_cosine,
            "cosine_std": self.std_cosine,
            "conflict_rate": self.conflict_rate,
            "pairs": self.pairs(),
            "mean_pair_cosine": self.mean_pair_cosine,
            "conflict_fraction": self.conflict_fraction,
            "groups": {g: {"cosine": group_mean[k],
                           "pairs": {pair_key(self.tasks[i], self.tasks[j]): float(group_mean[k, i, j])
                                     for i, j in combinations(range(len(self.tasks)), 2)}}
                       for k, g in enumerate(self.groups)},
            "per_batch": [b.pairs() for b in self.batches],
        })

    def to_markdown(self, title: str = "Gradient conflicts") -> str:
        """A Markdown section: the mean cosine matrix, the conflict rates and the per-group means."""
        def fmt(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:+.2f}"

        lines = [f"## {title}", "",
                 f"{len(self.batches)} batch(es), {self.num_images} image(s); cosine of the backbone gradients of "
                 f"two tasks' losses (each task alone through its pathway); < 0 is a conflict. Conflicting share "
                 f"of (pair, batch): {fmt(self.conflict_fraction).lstrip('+')}; mean pair cosine "
                 f"{fmt(self.mean_pair_cosine)}.", "",
                 "| | " + " | ".join(self.tasks) + " |", "|---|" + "---|" * len(self.tasks)]
        lines += [f"| {t} | " + " | ".join(fmt(v) for v in row) + " |" for t, row in zip(self.tasks, self.mean_cosine)]
        pairs = list(combinations(range(len(self.tasks)), 2))
        if pairs:
            lines += ["", "| group | " + " | ".join(pair_label(pair_key(self.tasks[i], self.tasks[j])) for i, j in pairs)
                      + " |",
                      "|---|" + "---|" * len(pairs)]
            group_mean = self.group_mean_cosine
            lines += [f"| {g} | " + " | ".join(fmt(group_mean[k, i, j]) for i, j in pairs) + " |"
                      for k, g in enumerate(self.groups)]
        lines.append("")
        return "\n".join(lines)


def _batch(dataset, indices: Sequence[int], size: tuple[int, int], tasks: Sequence[str], device) -> tuple:
    resize = Resize(size)
    samples = [resize(dataset[i], None) for i in indices]
    images = preprocess([s["image"] for s in samples], size).to(device)
    targets = {t: torch.stack([s[t] for s in samples]).to(device) for t in tasks}
    return images, targets


def measure_conflicts(model, dataset, tasks: Sequence[str] | None = None, *, batches: int = 4,
                      batch_size: int = 8, device: str | torch.device | None = None) -> ConflictReport:
    """``gradient_conflicts`` on the first ``batches`` batches of ``dataset`` (images in ``[0, 1]``; images
    and labels are resized to the model's ``img_size``), with the model in its current mode."""
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be >= 1, got {batches} and {batch_size}")
    requested = model.resolve_tasks(tasks)
    tasks = [t for t in model.tasks if t in requested]
    if len(tasks) < 2:  # a conflict is between two tasks' gradients
        raise InputError(f"gradient conflicts need two tasks or more, got {tasks}; give at least two distinct tasks "
                         f"of the model's {list(model.tasks)}")
    absent = [t for t in tasks if t not in getattr(dataset, "tasks", tasks)]
    if absent:
        raise DataError(f"the dataset has no labels for task(s) {absent}; it has {list(dataset.tasks)}")
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    device = next(model.parameters()).device if device is None else torch.device(device)
    size = tuple(model.config.img_size)
    results, seen = [], 0
    for b in range(batches):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, len(dataset))))
        if not indices:
            break
        images, targets = _batch(dataset, indices, size, tasks, device)
        results.append(gradient_conflicts(model, images, targets, tasks))
        seen += len(indices)
    if len(results) < batches:
        log.info("the dataset holds %d image(s): %d batch(es) instead of %d", len(dataset), len(results), batches)
    return ConflictReport(tasks=list(tasks), groups=results[0].groups, batches=results, num_images=seen)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def plot_conflict_matrices(matrices: Mapping[str, np.ndarray], tasks: Sequence[str], path: str | os.PathLike,
                           title: str = "gradient cosine between tasks (backbone)") -> str:
    """One PNG: a task × task heatmap of cosines (red < 0: conflict, blue > 0) per entry of
    ``matrices`` (``{model name: [T, T]}``), side by side, annotated."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from ..utils.figures import save_figure

    tasks = list(tasks)
    cell = 0.55
    side = max(2.6, cell * len(tasks) + 1.4)
    fig = Figure(figsize=(side * len(matrices) + 1.0, side + 0.5), layout="constrained")
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    image = None
    for ax, (name, matrix) in zip(axes, matrices.items()):
        matrix = np.asarray(matrix, dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu", vmin=-1, vmax=1)
        ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), labels=tasks, fontsize=8)
        ax.set_title(name, fontsize=10)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                v = matrix[i, j]
                ax.text(j, i, "-" if math.isnan(v) else f"{v:+.2f}", ha="center", va="center", fontsize=7,
                        color="white" if not math.isnan(v) and abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=list(axes), label="cosine", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, Path(path))


def plot_conflict_evolution(reports: Mapping[int, ConflictReport], path: str | os.PathLike) -> str:
    """One PNG: each task pair's mean cosine against the training step, and the conflict fraction."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from ..utils.figures import save_figure

    steps = sorted(reports)
    first = reports[steps[0]]
    fig = Figure(figsize=(9.5, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, j in combinations(range(len(first.tasks)), 2):
        key = pair_key(first.tasks[i], first.tasks[j])
        left.plot(steps, [reports[s].pairs().get(key, math.nan) for s in steps], marker="o", linewidth=1,
                  label=pair_label(key))
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_xlabel("step")
    left.set_ylabel("mean cosine")
    left.set_title("gradient cosine per task pair", fontsize=10)
    left.legend(fontsize=6, ncol=2)
    right.plot(steps, [reports[s].conflict_fraction for s in steps], marker="o", color="tab:red")
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("step")
    right.set_title("share of conflicting (pair, batch)", fontsize=10)
    return save_figure(fig, Path(path))
