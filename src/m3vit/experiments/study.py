"""Δm study over training seeds: single-task baselines and multi-task models, each trained with N seeds,
evaluated on the validation scenes and on held-out scenes, reported as mean ± std with paired Δm and
bootstrap intervals.

For every seed ``s`` (``train.seed`` of each run): the single-task config is trained on each task alone
(same recipe, the task's own loss weight) and each multi-task config on all tasks; every run is
evaluated with each task through its own pathway on two sets: ``val`` (the run's validation scenes)
and ``heldout`` (the same split rendered from another scene seed, ``data.seed`` = ``heldout_seed``, by
default ``data.seed + 1``), so results are also checked on scenes no choice was made on.

Statistics, per evaluation set (``m3vit.analysis.stats``):

* per model, task and metric: mean and sample std (n - 1) over the seeds, and the 95% percentile
  bootstrap interval of the mean;
* paired Δm per seed: each multi-task model against the *same seed's* single-task baselines
  (``vs_single``) and against the same seed's reference model, by default M-ViT (``vs_reference``);
  then their mean, std and bootstrap interval over the seeds. An interval that excludes 0 means the
  advantage (or deficit) exceeds the seed-to-seed spread; with one seed the interval is undefined.

Layout: ``OUT/seed-<s>/single/<task>/`` and ``OUT/seed-<s>/<run>/`` (training run folders; beside each,
``<name>.study_metrics.json`` caches its evaluations), ``OUT/seed-<s>/baselines.json``, ``OUT/study.json``,
``OUT/baselines.json`` (the seed-mean single-task metrics on ``val``, for ``m3vit eval --baselines``),
``OUT/report.md`` and ``OUT/figures/study.png``. Resumable: a run that finished is neither retrained
nor re-evaluated, an interrupted one continues from its newest checkpoint, and asking for more seeds
trains only the new ones.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..analysis.stats import DEFAULT_RESAMPLES, summarize
from ..utils.io import OutputFolder, write_json, write_text
from ..engine.builders import build_eval_dataset, loss_weights, run_tasks
from ..engine.config import ConfigError, RunConfig, load_config, parse_overrides, resolve_config_path
from ..engine.evaluator import evaluate
from ..engine.run_folder import FINAL, LOG_FILE
from ..models import load_checkpoint
from ..models.checkpoint import CONFIG, WEIGHTS
from ..tasks import delta_m
from ..tasks.registry import task_class
from ..utils.errors import InputError
from .demo import compare_configs, start_fresh, training_seconds
from .report import format_table, headline_metrics, plot_intervals

__all__ = ["run_study", "single_task_config", "DEFAULT_MULTI", "DEFAULT_SINGLE", "DEFAULT_REFERENCE",
           "EVAL_SETS"]

log = logging.getLogger(__name__)

#: The issue's study: M³ViT multi-gate, task-conditioned, shared router and M-ViT (shipped configs, by name).
DEFAULT_MULTI = {
    "m3vit": "synthetic/m3vit_tiny",
    "m3vit_task_conditioned": "synthetic/m3vit_tiny_task_conditioned",
    "m3vit_shared": "synthetic/m3vit_tiny_shared",
    "mvit": "synthetic/mvit_tiny",
}
#: The config trained once per task as the single-task baseline.
DEFAULT_SINGLE = "synthetic/mvit_tiny"
#: The multi-task run every other one is also compared with (paired Δm), when it is part of the study.
DEFAULT_REFERENCE = "mvit"
#: The evaluation sets: the validation scenes and the held-out scenes of another scene seed.
EVAL_SETS = ("val", "heldout")
METRICS_FILE = "study_metrics.json"


def single_task_config(cfg: RunConfig, task: str) -> RunConfig:
    """``cfg`` restricted to ``task``: the same recipe, with that task's loss weight only."""
    tasks = list(cfg.data.tasks) if cfg.data.tasks else None
    if tasks is not None and task not in tasks:
        raise ConfigError(f"data.tasks: {task!r} is not one of {tasks}")
    weights = cfg.train.loss_weights
    if weights is None:
        from ..data import reference_loss_weights

        weights = reference_loss_weights(cfg.data.name)
    if task not in weights:
        raise ConfigError(f"train.loss_weights: no weight for task {task!r}")
    return cfg.replace({"data.tasks": [task], "train.loss_weights": {task: weights[task]}})


# ----------------------------------------------------------------------------------------------
# One run: train (unless finished), evaluate on each set (unless already evaluated)
# ----------------------------------------------------------------------------------------------
def _finished_step(run_dir: Path, cfg: RunConfig) -> int | None:
    """The step of ``run_dir/final`` when it is the finished run of ``cfg`` (same run config, all
    ``train.steps`` done), else None."""
    final = run_dir / FINAL
    if cfg.train.steps is None or not (final / WEIGHTS).is_file() or not (final / CONFIG).is_file():
        return None
    try:
        meta = yaml.safe_load((final / CONFIG).read_text()) or {}
    except yaml.YAMLError:
        return None
    if meta.get("run") != cfg.to_dict() or meta.get("step") != cfg.train.steps:
        return None
    return int(meta["step"])


def _train_and_eval(cfg: RunConfig, run_dir: Path, eval_cfgs: Mapping[str, RunConfig], fresh: bool,
                    say: Callable[[str], None], cache_path: Path) -> dict[str, Any]:
    """Train ``run_dir`` (a trainer's run folder) unless finished, evaluate on each set unless ``cache_path``
    (the study's file beside the run, not inside it) already holds that evaluation."""
    from ..engine.trainer import train

    if fresh:
        start_fresh(run_dir)
    step = _finished_step(run_dir, cfg)
    if step is not None:
        say(f"  {run_dir}: finished ({step} steps), not retrained")
    else:
        step = train(cfg, run_dir, resume=run_dir.exists()).steps
    seconds = training_seconds(run_dir / LOG_FILE)
    cached = {}
    if cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            cached = {}
    if cached.get("step") != step:
        cached = {"step": step, "sets": {}}
    model = None
    for name, eval_cfg in eval_cfgs.items():
        data = eval_cfg.to_dict()["data"]
        entry = cached["sets"].get(name)
        if entry is not None and entry.get("data") == data:
            continue
        model = model or load_checkpoint(run_dir / FINAL)
        metrics = evaluate(model, build_eval_dataset(eval_cfg), eval_cfg=eval_cfg.eval,
                           batch_size=eval_cfg.eval.batch_size)
        cached["sets"][name] = {"data": data, "metrics": metrics}
        write_json(cache_path, cached)
    say(f"  {run_dir}: {step} steps, {seconds or 0:.0f} s of training")
    return {"metrics": {name: cached["sets"][name]["metrics"] for name in eval_cfgs},
            "checkpoint": str(run_dir / FINAL), "steps": step, "train_seconds": seconds,
            "model": cfg.model.name, "train_seed": cfg.train.seed}


def _delta(results: Mapping, baselines: Mapping) -> tuple[float | None, str | None]:
    try:
        return delta_m(results, baselines), None
    except ValueError as exc:  # e.g. a zero baseline metric after a very short run
        return None, str(exc)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
def _seed_list(seeds: int | Sequence[int], first: int) -> list[int]:
    if isinstance(seeds, bool):
        raise InputError(f"seeds must be a count >= 1 or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise InputError(f"--seeds must be >= 1, got {seeds}")
        return [first + i for i in range(seeds)]
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def run_study(out: str | Path, multi: Mapping[str, str | Path] | None = None, single: str | Path | None = None,
              overrides: Sequence[str] | dict | None = None, *, seeds: int | Sequence[int] = 1,
              heldout_seed: int | None = None, reference: str | None = DEFAULT_REFERENCE, fresh: bool = False,
              resamples: int = DEFAULT_RESAMPLES, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train and evaluate every run of the study with each seed; write ``study.json``, ``baselines.json``,
    ``report.md`` and ``figures/study.png`` (see the module docstring). Returns the study dict, with a
    plain-text ``table``.

    ``multi`` maps run name -> config (default ``DEFAULT_MULTI``), ``single`` is the single-task config
    (default ``DEFAULT_SINGLE``); ``overrides`` apply to every run. ``seeds`` is a count (``train.seed``,
    ``train.seed + 1``, ...) or a list of training seeds. ``heldout_seed`` is the ``data.seed`` of the
    held-out scenes (default ``data.seed + 1``). ``reference`` names the multi run the paired
    ``vs_reference`` Δm uses (skipped when the default ``mvit`` is not in ``multi``). ``fresh`` deletes
    earlier runs first.
    """
    started = time.perf_counter()
    out = Path(out)
    with OutputFolder(out, kind="study") as folder:  # locked: one study per folder at a time
        folder.claim(["baselines.json", "study.json", "report.md", "figures/study.png"])
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        multi_paths = {name: resolve_config_path(p) for name, p in (multi or DEFAULT_MULTI).items()}
        single_path = resolve_config_path(single if single is not None else DEFAULT_SINGLE)
        bad_names = [n for n in multi_paths if not n or "/" in n or n in ("single", "figures", ".", "..")
                     or n.startswith("seed-")]
        if bad_names:
            raise InputError(f"run name {bad_names[0]!r} cannot name a folder of the study; choose another")
        multi_cfgs = {name: load_config(path, overrides) for name, path in multi_paths.items()}
        base = load_config(single_path, overrides)
        compare_configs({"single": base, **multi_cfgs})
        if reference is not None and reference not in multi_cfgs:
            if reference != DEFAULT_REFERENCE:
                raise InputError(f"--reference {reference!r} is not one of the multi-task runs {list(multi_cfgs)}")
            reference = None
        seed_list = _seed_list(seeds, base.train.seed)
        heldout = base.data.seed + 1 if heldout_seed is None else heldout_seed
        if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0 or heldout == base.data.seed:
            raise InputError(f"--heldout-seed must be a scene seed >= 0 other than data.seed={base.data.seed}, "
                             f"got {heldout!r}")
        tasks = run_tasks(base)
        loss_weights(base, tasks)  # every task needs a weight before anything trains
        names = list(multi_cfgs)
        folder.claim([f"seed-{seed}/{file}" for seed in seed_list for file in (
            *(f"single/{task}.{METRICS_FILE}" for task in tasks), "baselines.json",
            *(f"{name}.{METRICS_FILE}" for name in names))])  # before any training: a user's file stops it now
        say(f"study: {len(seed_list)} seed(s) {seed_list} x ({len(tasks)} single-task baselines ({base.model.name}) "
            f"+ {len(names)} multi-task model(s) {names}); evaluated on the {base.data.val_split} scenes "
            f"(data.seed={base.data.seed}) and held-out scenes (data.seed={heldout})")

        def eval_cfgs(cfg: RunConfig) -> dict[str, RunConfig]:
            return {"val": cfg, "heldout": cfg.replace({"data.seed": heldout})}

        runs: dict[str, Any] = {}
        for seed in seed_list:
            root = out / f"seed-{seed}"
            seeded = {"train.seed": seed}
            single_runs = {}
            for task in tasks:
                say(f"[seed {seed}] [single/{task}] training")
                cfg = single_task_config(base, task).replace(seeded)
                single_runs[task] = _train_and_eval(cfg, root / "single" / task, eval_cfgs(cfg), fresh, say,
                                                    folder.path(f"seed-{seed}/single/{task}.{METRICS_FILE}"))
            baselines = {s: {task: run["metrics"][s][task] for task, run in single_runs.items()} for s in EVAL_SETS}
            write_json(folder.path(f"seed-{seed}/baselines.json"), {"metrics": baselines["val"]})
            multi_runs = {}
            for name, cfg in multi_cfgs.items():
                say(f"[seed {seed}] [{name}] training")
                cfg = cfg.replace(seeded)
                multi_runs[name] = _train_and_eval(cfg, root / name, eval_cfgs(cfg), fresh, say,
                                                   folder.path(f"seed-{seed}/{name}.{METRICS_FILE}"))
            for name, run in multi_runs.items():
                run["delta_m"] = {}
                for s in EVAL_SETS:
                    entry = {}
                    entry["vs_single"], error = _delta(run["metrics"][s], baselines[s])
                    if error:
                        entry["vs_single_error"] = error
                    if reference is not None and name != reference:
                        entry["vs_reference"], error = _delta(run["metrics"][s], multi_runs[reference]["metrics"][s])
                        if error:
                            entry["vs_reference_error"] = error
                    run["delta_m"][s] = entry
            runs[str(seed)] = {"single": single_runs, "multi": multi_runs}

        summary = _summarize(runs, tasks, names, reference, resamples)
        mean_baselines = {task: {m: v["mean"] for m, v in metrics.items() if v["mean"] is not None}
                          for task, metrics in summary["val"]["metrics"]["single"].items()}
        write_json(folder.path("baselines.json"), {"metrics": mean_baselines, "seeds": seed_list,
                                            "note": "mean over the seeds of the single-task metrics on the val scenes"})
        train_seconds = sum(r.get("train_seconds") or 0.0 for seed in runs.values()
                            for group in ("single", "multi") for r in seed[group].values())
        study = {
            "tasks": tasks, "seeds": seed_list, "runs_per_seed": len(tasks) + len(names), "multi": names,
            "reference": reference,
            "eval_sets": {"val": {"split": base.data.val_split, "data_seed": base.data.seed},
                          "heldout": {"split": base.data.val_split, "data_seed": heldout}},
            "configs": {"single": str(single_path), **{n: str(p) for n, p in multi_paths.items()}},
            # as given (a shipped name stays a name), for the report's command
            "config_args": {"single": str(single if single is not None else DEFAULT_SINGLE),
                            **{n: str(p) for n, p in (multi or DEFAULT_MULTI).items()}},
            "overrides": dict(overrides or {}),
            "statistics": {"std": "sample standard deviation over the seeds (n - 1)",
                           "ci": f"95% percentile bootstrap interval of the mean over the seeds ({resamples} resamples, "
                                 f"numpy generator seed 0); undefined (null) with fewer than two seeds",
                           "delta_m": "paired per seed: each multi-task model against the same seed's single-task "
                                      "baselines (vs_single) and the same seed's reference model (vs_reference)"},
            "runs": runs, "summary": summary,
            "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
        }
        figure = plot_intervals(_figure_data(summary, tasks, names), folder.path("figures/study.png"))
        study["figures"] = {"study": str(figure)}
        write_json(folder.path("study.json"), study)
        write_text(folder.path("report.md"), _report(study, out))
        study["table"] = _text_table(study)
        return study


def _summarize(runs: Mapping, tasks: list[str], names: list[str], reference: str | None,
               resamples: int) -> dict[str, Any]:
    seeds = list(runs)
    summary: dict[str, Any] = {}
    for s in EVAL_SETS:
        metrics: dict[str, Any] = {"single": {}}
        for task in tasks:
            first = runs[seeds[0]]["single"][task]["metrics"][s][task]
            metrics["single"][task] = {m: summarize([runs[k]["single"][task]["metrics"][s][task].get(m) for k in seeds],
                                                    resamples=resamples)
                                       for m, v in first.items() if isinstance(v, (int, float))}
        for name in names:
            metrics[name] = {}
            for task in tasks:
                first = runs[seeds[0]]["multi"][name]["metrics"][s][task]
                metrics[name][task] = {m: summarize([runs[k]["multi"][name]["metrics"][s][task].get(m) for k in seeds],
                                                    resamples=resamples)
                                       for m, v in first.items() if isinstance(v, (int, float))}
        deltas = {}
        for name in names:
            entry = {"vs_single": summarize([runs[k]["multi"][name]["delta_m"][s].get("vs_single") for k in seeds],
                                            resamples=resamples)}
            if reference is not None and name != reference:
                entry["vs_reference"] = summarize(
                    [runs[k]["multi"][name]["delta_m"][s].get("vs_reference") for k in seeds], resamples=resamples)
            for stats in entry.values():
                stats["exceeds_spread"] = _exceeds(stats)
            deltas[name] = entry
        summary[s] = {"metrics": metrics, "delta_m": deltas}
    return summary


def _exceeds(stats: Mapping[str, Any]) -> bool | None:
    """True when the bootstrap interval excludes 0, False when it holds 0, None when undefined."""
    if stats["ci"] is None:
        return None
    low, high = stats["ci"]
    return bool(low > 0 or high < 0)


# ----------------------------------------------------------------------------------------------
# Report, table, figure
# ----------------------------------------------------------------------------------------------
def _pm(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{stats['mean']:{sign}.2f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.2f}"
    return text


def _ci(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats["ci"] is None:
        return "undefined (1 seed)" if stats and stats["n"] == 1 else "-"
    return f"[{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}]"


def _verdict(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats["exceeds_spread"] is None:
        return "undefined with one seed" if stats and stats["n"] == 1 else "-"
    return "yes: the interval excludes 0" if stats["exceeds_spread"] else "no: the interval holds 0"


def _models(study: Mapping) -> list[str]:
    return ["single", *study["multi"]]


def _metric_rows(study: Mapping, s: str) -> list[list[str]]:
    rows = []
    metrics = study["summary"][s]["metrics"]
    for task in study["tasks"]:
        example = {m: v["mean"] for m, v in metrics["single"][task].items()}
        for metric in headline_metrics(task, example):
            arrow = "↑" if task_class(task).metric_higher_is_better(metric) else "↓"
            rows.append([task, metric + arrow, *(_pm(metrics[m][task].get(metric)) for m in _models(study))])
    return rows


def _delta_rows(study: Mapping, s: str) -> list[list[str]]:
    rows = []
    for name, entry in study["summary"][s]["delta_m"].items():
        ref = entry.get("vs_reference")
        rows.append([name, _pm(entry["vs_single"], True), _ci(entry["vs_single"]), _verdict(entry["vs_single"]),
                     _pm(ref, True) if ref else "-", _ci(ref) if ref else "-", _verdict(ref) if ref else "-"])
    return rows


def _delta_headers(study: Mapping) -> list[str]:
    ref = study["reference"] or "reference"
    return ["model", "Δm % vs single", "95% CI", "beyond seed spread?", f"Δm % vs {ref}", "95% CI",
            "beyond seed spread?"]


def _set_title(study: Mapping, s: str) -> str:
    info = study["eval_sets"][s]
    what = "validation scenes" if s == "val" else "held-out scenes"
    return f"{what} ({info['split']} split, data.seed={info['data_seed']})"


def _text_table(study: Mapping) -> str:
    n = len(study["seeds"])
    lines = []
    for s in EVAL_SETS:
        lines.append(f"{_set_title(study, s)}: mean ± std over {n} seed(s)")
        lines.append(format_table(["task", "metric", *_models(study)], _metric_rows(study, s)))
        lines.append("")
        lines.append(format_table(_delta_headers(study), _delta_rows(study, s)))
        lines.append("")
    return "\n".join(lines).rstrip()


def _report(study: Mapping, out: Path) -> str:
    n = len(study["seeds"])
    lines = ["# m3vit study: multi-task models against single-task baselines over seeds", "",
             f"Training seeds {study['seeds']} ({n}); each seed trains {len(study['tasks'])} single-task baselines "
             f"and the multi-task models {', '.join(study['multi'])}. Metrics are mean ± sample std over the seeds; "
             "Δm is paired per seed (each model against the same seed's baselines"
             + (f" and the same seed's {study['reference']}" if study["reference"] else "") + "); the interval is "
             "the 95% percentile bootstrap interval of the mean Δm over the seeds"
             + (" (undefined with one seed: no spread to resample)." if n == 1 else
                f" (with {n} seeds it is coarse: at most the range of the per-seed values)."), ""]
    for s in EVAL_SETS:
        lines += [f"## {_set_title(study, s)}", "",
                  format_table(["task", "metric", *_models(study)], _metric_rows(study, s), markdown=True), "",
                  format_table(_delta_headers(study), _delta_rows(study, s), markdown=True), ""]
    lines += ["A model's advantage exceeds the seed-to-seed spread when its interval excludes 0.", ""]
    figure = Path(study["figures"]["study"])
    lines += ["## Per-task metrics with intervals", "", f"![per-task bars]({figure.relative_to(out)})", "",
              "Bars: mean over the seeds; whiskers: 95% bootstrap interval of the mean; dots: the seeds.", ""]
    lines += ["## Cost", "",
              f"Training time summed over the {n * study['runs_per_seed']} runs: {study['train_seconds'] / 60:.1f} min; "
              f"this invocation's wall time: {study['wall_seconds'] / 60:.1f} min (finished runs are not retrained).", "",
              "## Reproduce", "", "```bash",
              f"m3vit study --out {shlex.quote(str(out))} --seeds {n} "
              f"--heldout-seed {study['eval_sets']['heldout']['data_seed']}"
              + " \\\n  --multi" + "".join(f" {shlex.quote(name)} {shlex.quote(study['config_args'][name])}"
                                              for name in study["multi"])
              + f" \\\n  --single {shlex.quote(study['config_args']['single'])}"
              + "".join(f" \\\n  --set {shlex.quote(f'{key}={json.dumps(value)}')}"
                        for key, value in study["overrides"].items()),
              "```", ""]
    return "\n".join(lines)


def _figure_data(summary: Mapping, tasks: list[str], names: list[str]) -> dict[str, Any]:
    """Panels for ``plot_intervals``: per evaluation set, each task's primary metric and Δm vs single."""
    panels = {}
    for s in EVAL_SETS:
        row = {}
        for task in tasks:
            metric = task_class(task).primary_metric
            arrow = "↑" if task_class(task).metric_higher_is_better(metric) else "↓"
            row[f"{task} {metric}{arrow}"] = {m: summary[s]["metrics"][m][task].get(metric) for m in ["single", *names]}
        row["Δm % vs single"] = {m: summary[s]["delta_m"][m]["vs_single"] for m in names}
        panels[s] = row
    return panels
