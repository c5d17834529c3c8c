"""Δm study: train single-task baselines and multi-task models on the same data, report each model's Δm.

For every task of the data, the single-task config is trained on that task alone (same recipe, the
task's own loss weight); each multi-task config is trained on all tasks; all are evaluated with
every task through its own pathway. ``baselines.json`` (``{"metrics": {task: {...}}}``) can be passed
to ``m3vit eval --baselines`` later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.builders import build_eval_dataset, build_train_dataset, loss_weights
from ..engine.config import ConfigError, RunConfig, load_config, parse_overrides
from ..engine.evaluator import evaluate
from ..models import load_checkpoint
from ..tasks import delta_m
from .demo import compare_configs, start_fresh, training_seconds
from ..utils.io import OutputFolder, write_json, write_text
from .report import format_table, metrics_table

__all__ = ["run_study", "single_task_config"]

log = logging.getLogger(__name__)


def single_task_config(cfg: RunConfig, task: str) -> RunConfig:
    """``cfg`` restricted to ``task``: the same recipe, with that task's loss weight only."""
    tasks = list(cfg.data.tasks) if cfg.data.tasks else None
    if tasks is not None and task not in tasks:
        raise ConfigError(f"data.tasks: {task!r} is not one of {tasks}")
    weights = cfg.train.loss_weights
    if weights is None:
        from ..tasks import default_loss_weights

        weights = default_loss_weights(cfg.data.name)
    if task not in weights:
        raise ConfigError(f"train.loss_weights: no weight for task {task!r}")
    return cfg.replace({"data.tasks": [task], "train.loss_weights": {task: weights[task]}})


def _train_and_eval(cfg: RunConfig, out: Path, fresh: bool, say) -> dict[str, Any]:
    from ..engine.trainer import train

    if fresh:
        start_fresh(out)
    result = train(cfg, out, resume=out.exists())
    seconds = training_seconds(result.log_path)
    model = load_checkpoint(out / "final")
    metrics = evaluate(model, build_eval_dataset(cfg), eval_cfg=cfg.eval, batch_size=cfg.eval.batch_size)
    say(f"  {out}: {result.steps} steps, {seconds or 0:.0f} s of training")
    return {"metrics": metrics, "checkpoint": str(out / "final"), "steps": result.steps, "train_seconds": seconds,
            "model": cfg.model.name}


def run_study(out: str | Path, multi: Mapping[str, str | Path], single: str | Path,
              overrides: Sequence[str] | dict | None = None, *, fresh: bool = False,
              say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train the single-task baselines of ``single`` (one per task) and each config of ``multi``
    (``{run name: config path}``); write ``study.json``, ``baselines.json`` and ``report.md``."""
    out = Path(out)
    with OutputFolder(out, kind="study") as folder:  # locked: one study per folder at a time
        folder.claim(["baselines.json", "study.json", "report.md"])
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        multi_cfgs = {name: load_config(path, overrides) for name, path in multi.items()}
        base = load_config(single, overrides)
        compare_configs({"single": base, **multi_cfgs})
        tasks = list(build_train_dataset(base).tasks) if base.data.tasks is None else list(base.data.tasks)
        loss_weights(base, tasks)  # every task needs a weight before anything trains
        say(f"study: {len(tasks)} single-task baselines ({base.model.name}) + {len(multi_cfgs)} multi-task model(s)")
        single_runs = {}
        for task in tasks:
            say(f"[single/{task}] training")
            single_runs[task] = _train_and_eval(single_task_config(base, task), out / "single" / task, fresh, say)
        baselines = {task: run["metrics"][task] for task, run in single_runs.items()}
        write_json(folder.path("baselines.json"), {"metrics": baselines})
        multi_runs = {}
        for name, cfg in multi_cfgs.items():
            say(f"[{name}] training")
            run = _train_and_eval(cfg, out / name, fresh, say)
            try:
                run["delta_m"] = delta_m(run["metrics"], baselines)
            except ValueError as exc:
                run["delta_m"] = None
                run["delta_m_error"] = str(exc)
            multi_runs[name] = run
        study = {"tasks": tasks, "single": single_runs, "multi": multi_runs, "baselines": baselines}
        write_json(folder.path("study.json"), study)
        columns = {"single-task": baselines, **{n: r["metrics"] for n, r in multi_runs.items()}}
        table = metrics_table(columns, diff=False)
        dm = format_table(["model", "Δm % vs single-task"], [[n, r["delta_m"]] for n, r in multi_runs.items()])
        write_text(folder.path("report.md"), "\n".join([
            "# m3vit study: Δm against single-task baselines", "",
            metrics_table(columns, markdown=True, diff=False), "",
            format_table(["model", "Δm % vs single-task"], [[n, r["delta_m"]] for n, r in multi_runs.items()],
                         markdown=True), "",
            f"Baselines: `{out / 'baselines.json'}` (`m3vit eval --checkpoint ... --baselines` accepts it).", ""]))
        study["table"] = f"{table}\n\n{dm}"
        return study
