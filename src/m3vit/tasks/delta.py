"""Multi-task gain Δm: the mean relative improvement of each task's metric over a single-task baseline.

The paper's single-task baselines ship with the package (``m3vit/tasks/baselines/*.json``:
PASCAL-Context ResNet-18, NYUD-v2 ResNet-50; ``reference_baselines_path``). The official Δm
(``reference_delta_m``) uses them and leaves edge out, as the official code never scores edge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..utils.errors import ConfigError, DataError
from .registry import task_class

__all__ = ["delta_m", "load_baselines", "reference_baselines_path", "reference_delta_m", "REFERENCE_BASELINE_FILES",
           "REFERENCE_DELTA_M_EXCLUDES"]

#: What a folder given as baselines is searched for, in order: a study's mean single-task baselines
#: (``m3vit study --out``, also each ``seed-N/``), then a metrics file of the user's.
_RUN_FILES = ("baselines.json", "metrics.json", "results.json")
_BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
#: Dataset name -> packaged file of the paper's single-task baselines.
REFERENCE_BASELINE_FILES = {"pascal_context": "pascal_context_resnet18.json", "nyud": "nyud_resnet50.json"}
#: Tasks the official Δm leaves out (its evaluation never scores edge).
REFERENCE_DELTA_M_EXCLUDES = ("edge",)


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, str] | None = None,
) -> float:
    """Δm in percent: mean over the tasks of ``results`` of ``±(M - B) / B × 100``.

    ``results`` and ``baselines`` map task name -> {metric: value}. Each task uses the metric named
    in ``metrics[task]``, else its ``primary_metric`` (semseg/human_parts/sal mIoU, normals mean,
    edge odsF, depth rmse); the sign is + when higher is better and - for errors, so beating the
    baseline is always positive. A task missing from ``baselines``, a missing metric, a zero
    baseline raises ``DataError``, an unknown task name ``ConfigError`` (both ``ValueError``).
    """
    metrics = dict(metrics or {})
    if not results:
        raise DataError("results hold no task; Δm needs at least one")
    unused = sorted(set(metrics) - set(results))
    if unused:
        raise ConfigError(f"metrics names task(s) {unused} that are not in the results {sorted(results)}")
    gains = []
    for task, values in results.items():
        cls = task_class(task)
        metric = metrics.get(task, cls.primary_metric)
        higher = cls.metric_higher_is_better(metric)
        if task not in baselines:
            raise DataError(f"no baseline for task {task!r}; baselines cover {sorted(baselines)}")
        if metric not in values:
            raise DataError(f"results for task {task!r} lack metric {metric!r} (have {sorted(values)})")
        if metric not in baselines[task]:
            raise DataError(f"baseline for task {task!r} lacks metric {metric!r} (has {sorted(baselines[task])})")
        m, b = float(values[metric]), float(baselines[task][metric])
        if b == 0 or not math.isfinite(b):
            raise DataError(f"baseline {task}/{metric} is {b}; Δm needs a finite non-zero baseline")
        if not math.isfinite(m):
            raise DataError(f"result {task}/{metric} is {m}; Δm needs a finite value")
        gain = (m - b) / b * 100
        gains.append(gain if higher else -gain)
    return sum(gains) / len(gains)


def _as_task_metrics(data: object, source: Path) -> dict[str, dict[str, float]]:
    if isinstance(data, Mapping) and "metrics" in data and isinstance(data["metrics"], Mapping):
        data = data["metrics"]
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{source}: expected a JSON object {{task: {{metric: value}}}} (optionally under 'metrics')")
    out: dict[str, dict[str, float]] = {}
    for task, values in data.items():
        if not isinstance(values, Mapping):
            raise DataError(
                f"{source}: entry {task!r} must be an object {{metric: value}}, got {type(values).__name__}"
            )
        out[str(task)] = {}
        for metric, value in values.items():
            if isinstance(value, Mapping):  # e.g. the demo's results.json: several runs, not one's metrics
                raise DataError(f"{source}: {task}/{metric} is an object, not a number: give one run's metrics "
                                f"{{task: {{metric: value}}}} (an `m3vit eval --out` report, a study's baselines.json)")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{source}: {task}/{metric} must be a number, got {value!r}")
            out[str(task)][str(metric)] = float(value)
    return out


def load_baselines(path: str | Path) -> dict[str, dict[str, float]]:
    """Baseline metrics ``{task: {metric: value}}`` from a JSON file or a folder.

    The JSON holds ``{task: {metric: value}}`` or ``{"metrics": {task: {metric: value}}}`` (an ``m3vit eval
    --out`` report, a study's ``baselines.json``); a folder must contain one of ``_RUN_FILES`` of that form
    (a ``m3vit study --out`` folder or one of its ``seed-N/`` folders).
    """
    path = Path(path)
    if path.is_dir():
        for name in _RUN_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"folder {path} holds none of {list(_RUN_FILES)} (give a JSON file of single-task "
                                    f"metrics, e.g. an `m3vit eval --out` report, or an `m3vit study --out` folder)")
    elif not path.is_file():
        raise FileNotFoundError(f"baselines file {path} does not exist (give a JSON file or a run directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a JSON text file (it is not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    return _as_task_metrics(data, path)


def reference_baselines_path(dataset: str) -> Path | None:
    """The packaged baselines file of ``dataset`` (``None`` for a dataset the paper has none for)."""
    name = REFERENCE_BASELINE_FILES.get(dataset)
    return None if name is None else _BASELINES_DIR / name


def reference_delta_m(results: Mapping[str, Mapping[str, float]],
                      baselines: Mapping[str, Mapping[str, float]]) -> tuple[float, list[str]]:
    """The official Δm: ``delta_m`` over the tasks of ``results`` except ``REFERENCE_DELTA_M_EXCLUDES``
    (edge); returns ``(Δm in percent, the tasks it covers)``. Raises ``ValueError`` when no task is left
    or one has no baseline."""
    kept = {t: v for t, v in results.items() if t not in REFERENCE_DELTA_M_EXCLUDES}
    if not kept:
        raise ValueError(f"the official Δm leaves out {list(REFERENCE_DELTA_M_EXCLUDES)}; no other task in "
                         f"{sorted(results)}")
    return delta_m(kept, baselines), list(kept)
