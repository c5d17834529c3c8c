"""Figures and tables for experiment reports: training curves, sample predictions, metric tables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from ..utils import tables
from ..engine.builders import build_tasks
from ..engine.run_folder import read_log
from ..engine.inference import predict
from ..tasks import task_class, task_title
from ..utils.errors import ConfigError, InputError
from ..utils.figures import image_to_uint8, new_figure, picture_grid, save_figure

__all__ = ["plot_curves", "plot_predictions", "plot_intervals", "metrics_table", "format_table",
           "headline_metrics"]

def _log_records(path: str | os.PathLike) -> list[dict]:
    records = read_log(path)
    if records is None:
        raise InputError(f"{path} is not an m3vit training log (one JSON record with a step per line)")
    return records


def plot_curves(logs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> str:
    """One PNG: total training loss and each task's loss against the step, one line per run."""
    runs = {name: [r for r in _log_records(p) if "loss" in r] for name, p in logs.items()}
    tasks = sorted({k.split("/", 1)[1] for records in runs.values() for r in records for k in r
                    if k.startswith("loss/")})
    panels = ["total"] + tasks
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(3.2 * cols, 2.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        key = "loss" if panel == "total" else f"loss/{panel}"
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name, linewidth=1.2)
        ax.set_title("total loss (weighted)" if panel == "total" else f"{task_title(panel)} loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if panel == "total":
            ax.legend(fontsize=7)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def plot_predictions(models: Mapping[str, torch.nn.Module], dataset, indices: Sequence[int], task: str,
                     path: str | os.PathLike) -> str:
    """One PNG for ``task``: a row per sample with the image, the label and each model's prediction
    (each task run through its own pathway, upsampled to the label)."""
    first = next(iter(models.values()))
    task_obj = build_tasks({task: first.config.tasks[task]}, dataset)[task]
    rows = []
    for index in indices:
        sample = dataset[index]
        label = sample[task]
        pictures = [image_to_uint8(sample["image"]), task_obj.colorize(label, kind="label")]
        for model in models.values():
            pred = predict(model, [sample["image"]], [task], out_size=label.shape[-2:])[task]
            pictures.append(task_obj.colorize(pred[0], kind="pred"))
        rows.append(pictures)
    return picture_grid(rows, ["image", "label", *models], path, cell=1.8, title=task_title(task))


def plot_intervals(panels: Mapping[str, Mapping[str, Mapping[str, Mapping | None]]],
                   path: str | os.PathLike) -> str:
    """One PNG of bars with intervals: a row per ``panels`` key (e.g. an evaluation set), a panel per
    inner key (e.g. a task's metric), a bar per model with its mean, whiskers from its ``ci`` (when
    defined) and a dot per seed value. Stats are ``m3vit.analysis.stats.summarize`` dicts (None: no bar)."""
    rows = list(panels)
    cols = max(len(p) for p in panels.values())
    fig = new_figure(2.7 * cols, 2.6 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    colors = {}
    for r, row in enumerate(rows):
        for c, (title, stats) in enumerate(panels[row].items()):
            ax = axes[r][c]
            names = list(stats)
            for x, name in enumerate(names):
                entry = stats[name]
                color = colors.setdefault(name, f"C{len(colors) % 10}")
                if not entry or entry.get("mean") is None:
                    continue
                mean = entry["mean"]
                err = None
                if entry.get("ci") is not None:
                    low, high = entry["ci"]
                    err = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]]
                ax.bar(x, mean, color=color, alpha=0.75, yerr=err, capsize=3, error_kw={"linewidth": 1})
                values = entry.get("values") or []
                ax.scatter([x] * len(values), values, s=9, color="black", zorder=3)
            ax.set_xticks(range(len(names)), labels=names, rotation=40, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.axhline(0.0, color="grey", linewidth=0.6)
            ax.set_title(f"{title} ({row})", fontsize=8)
        for c in range(len(panels[row]), cols):
            axes[r][c].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def headline_metrics(task: str, metrics: Mapping[str, float]) -> list[str]:
    """The metric names a table shows for ``task``: those of its ``Task.headline_metrics`` that ``metrics``
    has, else (an unknown task, or none present) every scalar one."""
    try:
        headline = task_class(task).headline_metrics
    except ConfigError:  # a task m3vit does not know
        headline = ()
    names = [m for m in headline if m in metrics]
    return names or [m for m in metrics if "/" not in m]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """A report table (plain text or Markdown); numbers are formatted with ``_fmt``, ``None`` as ``-``."""
    return tables.format_table(headers, rows, cell=_fmt, sep="  ", markdown=markdown)


def metrics_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], markdown: bool = False,
                  diff: bool = True) -> str:
    """Rows task/metric, one column per run (``{run: {task: {metric: v}}}``), plus ``a - b`` for two runs."""
    names = list(results)
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    headers = ["task", "metric", *names]
    two = diff and len(names) == 2
    if two:
        headers += [f"{names[0]} - {names[1]}", "better"]
    rows = []
    for task in tasks:
        first = next(r[task] for r in results.values() if task in r)
        for metric in headline_metrics(task, first):
            values = [results[n].get(task, {}).get(metric) for n in names]
            row = [task, metric, *values]
            if two:
                a, b = values
                if a is None or b is None:
                    row += [None, "-"]
                else:
                    higher = task_class(task).metric_higher_is_better(metric)
                    better = "=" if a == b else names[0] if (a > b) == higher else names[1]
                    row += [a - b, better]
            rows.append(row)
    return format_table(headers, rows, markdown=markdown)
