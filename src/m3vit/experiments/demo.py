"""The main job: train M³ViT and the dense M-ViT on the same data and budget, evaluate, compare, report.

``run_demo`` trains both models from their run configs (by default the shipped ``synthetic/m3vit_tiny``
and ``synthetic/mvit_tiny``), evaluates each saved ``final/`` checkpoint with every task through its own
pathway (exactly what ``m3vit eval --checkpoint`` does), measures per-task GFLOPs and CPU latency of
single-task vs all-task inference and the gradient conflicts between the tasks of each model (cosines
of their backbone gradients on a few validation batches, ``m3vit.analysis``), and writes
``results.json``, ``report.md`` and the figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..efficiency import count_flops
from ..efficiency.latency import measure_latency_side_by_side
from ..engine.builders import build_eval_dataset, build_train_dataset, run_tasks
from ..engine.config import ConfigError, RunConfig, load_config, resolve_config_path
from ..engine.evaluator import evaluate
from ..engine.run_folder import FINAL, LOG_FILE, read_log, remove_run_folder
from ..models import load_checkpoint
from ..tasks import delta_m
from ..utils.errors import OutputError
from ..utils.io import OutputFolder, write_json, write_text
from .report import format_table, metrics_table, plot_curves, plot_predictions

__all__ = ["DEFAULT_CONFIGS", "DemoResult", "run_demo", "compare_configs", "efficiency_summary"]

log = logging.getLogger(__name__)

#: Run names and their default configs (shipped configs, by name; see ``m3vit.engine.config.shipped_configs``).
DEFAULT_CONFIGS = {"m3vit": "synthetic/m3vit_tiny", "mvit": "synthetic/mvit_tiny"}

# Settings that must agree for the comparison to be fair (same data, same optimisation budget).
_SHARED_SECTIONS = ("data", "train", "eval")


def compare_configs(configs: Mapping[str, RunConfig]) -> None:
    """Raise ``ConfigError`` unless every run shares the data, train and eval sections."""
    (first_name, first), *rest = configs.items()
    base = first.to_dict()
    for name, cfg in rest:
        other = cfg.to_dict()
        for section in _SHARED_SECTIONS:
            for key in base[section]:
                if base[section][key] != other[section][key]:
                    raise ConfigError(
                        f"{section}.{key}: {first_name} has {base[section][key]!r} but {name} has "
                        f"{other[section][key]!r}; a fair comparison needs the same data, training and "
                        f"evaluation settings")


def _gflops(model, img_size: Sequence[int]) -> tuple[dict[str, float], float]:
    report = count_flops(model, tuple(img_size))
    gflops = {t: r["gflops"] for t, r in report.by_task.items()}
    gflops["all"] = report.gflops
    return gflops, report.params_m


def efficiency_summary(models: Mapping[str, Any], img_size: Sequence[int], repeats: int = 5) -> dict[str, dict]:
    """Per model (``{name: model}``, the same tasks): per-task and all-task GFLOPs and median CPU latency (ms)
    of single-task vs all-task inference (batch 1), every model and setting timed round-robin in one run
    (``measure_latency_side_by_side``), so the models' latencies compare under the same machine load.

    ``gflops`` is the active compute: the MoE layers counted with per-expert dispatch, which executes
    exactly the routed tokens. ``gflops_executed`` counts what the model's configured dispatch runs,
    which on short queues ("auto" -> batched) includes the rows padded to the longest queue.
    """
    out = {}
    for name, model in models.items():
        executed, params = _gflops(model, img_size)
        saved = [layer.dispatch for layer in model.moe_layers]
        try:
            for layer in model.moe_layers:
                layer.dispatch = "per_expert"
            active, _ = _gflops(model, img_size)
        finally:
            for layer, dispatch in zip(model.moe_layers, saved):
                layer.dispatch = dispatch
        out[name] = {"params_m": params, "gflops": active, "gflops_executed": executed,
                     "threads": torch.get_num_threads(), "img_size": list(img_size), "batch_size": 1}
    tasks = next(iter(models.values())).tasks
    settings = [[t] for t in tasks] + [None]
    timings = measure_latency_side_by_side(models, tuple(img_size), settings, repeats=repeats, warmup=1)
    for name, runs in timings.items():
        out[name]["latency_ms"] = {("all" if s is None else s[0]): r["median_ms"] for s, r in zip(settings, runs)}
    return out


@dataclass
class DemoResult:
    out: Path
    results: dict[str, Any] = field(default_factory=dict)
    table: str = ""


def start_fresh(run_dir: Path) -> None:
    """Delete what m3vit wrote in the training run folder ``run_dir`` (for ``--fresh``); a file it did not
    write stops the fresh start with an ``OutputError`` naming it (it is never deleted)."""
    left = remove_run_folder(run_dir)
    if left:
        raise OutputError(f"cannot start {run_dir} afresh: it holds {', '.join(left[:3])}, which m3vit did not "
                          f"write; move those files or choose another --out")


def _train(cfg: RunConfig, out: Path, fresh: bool) -> dict[str, Any]:
    from ..engine.trainer import train

    if fresh:
        start_fresh(out)
    result = train(cfg, out, resume=out.exists())
    return {"train_seconds": training_seconds(result.log_path), "steps": result.steps}


def training_seconds(log_path: Path) -> float | None:
    """Training time of a run, summed over its resumes (the last ``time`` in its ``log.jsonl``)."""
    times = [r["time"] for r in read_log(log_path) or [] if "time" in r]
    return times[-1] if times else None


def run_demo(out: str | Path = "demo-out", configs: Mapping[str, str | Path] | None = None,
             overrides: Sequence[str] | dict | None = None, *, fresh: bool = False, latency_repeats: int = 5,
             samples: int = 3, conflict_batches: int = 2, say: Callable[[str], None] = log.info) -> DemoResult:
    """Train, evaluate and compare; ``configs`` maps run name -> config path (default ``DEFAULT_CONFIGS``).

    ``overrides`` (``--set`` strings or a dotted dict) apply to every run. A run directory that
    already holds a run of the same config is resumed (a finished one is not retrained); ``fresh``
    deletes it first. ``conflict_batches`` validation batches measure the gradient conflicts (0, or a single
    task: skipped).
    ``say`` receives progress lines.
    """
    out = Path(out)
    with OutputFolder(out, kind="demo") as folder:  # locked: one demo per folder at a time
        folder.claim(["results.json", "report.md"])
        paths = {name: resolve_config_path(p) for name, p in (configs or DEFAULT_CONFIGS).items()}
        cfgs = {name: load_config(path, overrides) for name, path in paths.items()}
        compare_configs(cfgs)
        tasks = run_tasks(next(iter(cfgs.values())))
        conflicts = conflict_batches > 0 and len(tasks) > 1  # a conflict is between two tasks
        # Every file the demo writes, claimed before any training: a file of the user's there stops it now.
        folder.claim(_figure_names(out, tasks, conflicts))
        results: dict[str, Any] = {}
        models = {}
        for name, cfg in cfgs.items():
            say(f"[{name}] training {cfg.model.name} for {cfg.train.steps or cfg.train.epochs} "
                f"{'steps' if cfg.train.steps else 'epochs'} ({paths[name]}) -> {out / name}")
            info = _train(cfg, out / name, fresh)
            final = out / name / FINAL
            model = load_checkpoint(final)
            models[name] = model
            dataset = build_eval_dataset(cfg)
            say(f"[{name}] evaluating {final} on {len(dataset)} {cfg.data.val_split} samples, each task on its own pathway")
            start = time.perf_counter()
            metrics = evaluate(model, dataset, eval_cfg=cfg.eval, batch_size=cfg.eval.batch_size, pathway="single")
            info["eval_seconds"] = time.perf_counter() - start
            results[name] = {"metrics": metrics, "checkpoint": str(final), "config": str(paths[name]),
                             "model": cfg.model.name, **info}
        size = next(iter(cfgs.values())).data.size
        say(f"measuring GFLOPs and CPU latency at {size[0]}x{size[1]}, {', '.join(models)} timed side by side")
        for name, summary in efficiency_summary(models, size, latency_repeats).items():
            results[name].update(summary)
        names = list(cfgs)
        first_cfg = cfgs[names[0]]
        if len(names) == 2:
            a, b = names
            ma, mb = results[a]["metrics"], results[b]["metrics"]
            results["diff"] = {t: {k: ma[t][k] - mb[t][k] for k in ma[t] if k in mb.get(t, {})} for t in ma}
            try:
                results["delta_m"] = {"value": delta_m(ma, mb), "of": a, "baseline": b}
            except ValueError as exc:  # e.g. a zero baseline metric after a very short run
                results["delta_m"] = {"value": None, "of": a, "baseline": b, "error": str(exc)}
        figures = _figures(out, folder, cfgs, models, results, samples, say)
        if conflicts:
            figures["conflicts"] = _conflicts(folder, cfgs, models, results, conflict_batches, say)
        results["figures"] = figures
        write_json(folder.path("results.json"), results)
        table = _summary(results, names, first_cfg)
        write_text(folder.path("report.md"), _report(results, names, cfgs, paths, table, figures))
        say(f"wrote {out / 'results.json'} and {out / 'report.md'}")
        return DemoResult(out=out, results=results, table=table)


def _figure_names(out: Path, tasks: list[str], conflicts: bool) -> list[str]:
    """The figures ``_figures`` and ``_conflicts`` may write (relative to ``out``); the expert heatmaps are
    named after the model's MoE blocks, so every such name already in ``figures/experts`` counts."""
    names = ["figures/curves.png", *(f"figures/predictions_{task}.png" for task in tasks)]
    if conflicts:
        names.append("figures/conflicts.png")
    experts = out / "figures" / "experts"
    if experts.is_dir():
        names += sorted(f"figures/experts/{p.name}" for p in experts.glob("experts_*.png"))
    return names


def _figures(out: Path, folder: OutputFolder, cfgs, models, results, samples: int, say) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    logs = {name: out / name / LOG_FILE for name in cfgs if (out / name / LOG_FILE).is_file()}
    if logs:
        figures["curves"] = str(plot_curves(logs, folder.path("figures/curves.png")))
    cfg = next(iter(cfgs.values()))
    dataset = build_eval_dataset(cfg)
    indices = list(range(min(samples, len(dataset))))
    figures["predictions"] = {}
    for task in next(iter(models.values())).tasks:
        figures["predictions"][task] = str(plot_predictions(models, dataset, indices, task,
                                                            folder.path(f"figures/predictions_{task}.png")))
    moe = {name: m for name, m in models.items() if m.moe_layers}
    if moe:
        from ..analysis.experts import expert_usage, plot_heatmaps

        name, model = next(iter(moe.items()))
        say(f"[{name}] counting expert usage per task on the {cfg.data.val_split} split")
        usage = expert_usage(model, dataset, batch_size=cfg.eval.batch_size)
        results[name]["experts"] = usage.to_dict()
        figures["experts"] = [str(p) for p in plot_heatmaps(usage, lambda name: folder.path(f"figures/experts/{name}"))]
    return figures


def _conflicts(folder: OutputFolder, cfgs, models, results, batches: int, say) -> str:
    """Each model's gradient-conflict matrix on the first ``batches`` validation batches (models in eval
    mode), into ``results[name]["conflicts"]``; one figure with the matrices side by side."""
    from ..analysis import measure_conflicts, plot_conflict_matrices

    cfg = next(iter(cfgs.values()))
    dataset = build_eval_dataset(cfg)
    matrices = {}
    for name, model in models.items():
        say(f"[{name}] measuring gradient conflicts between the tasks on {batches} {cfg.data.val_split} batch(es)")
        model.eval()
        report = measure_conflicts(model, dataset, batches=batches, batch_size=cfg.eval.batch_size)
        results[name]["conflicts"] = report.to_dict()
        matrices[name] = report.mean_cosine
    tasks = next(iter(models.values())).tasks
    return str(plot_conflict_matrices(matrices, tasks, folder.path("figures/conflicts.png"),
                                      title="cosine of two tasks' backbone gradients (< 0: conflict)"))


def _conflict_section(results: dict, names: list[str], base: Path, figure: str) -> list[str]:
    with_conflicts = [n for n in names if "conflicts" in results[n]]
    first = results[with_conflicts[0]]["conflicts"]
    from ..analysis import pair_label

    rows = [[pair_label(pair), *(results[n]["conflicts"]["pairs"].get(pair) for n in with_conflicts)]
            for pair in first["pairs"]]
    rows.append(["mean over pairs", *(results[n]["conflicts"]["mean_pair_cosine"] for n in with_conflicts)])
    rows.append(["conflicting share of (pair, batch)",
                 *(results[n]["conflicts"]["conflict_fraction"] for n in with_conflicts)])
    return ["## Gradient conflicts between tasks", "",
            f"Cosine between two tasks' loss gradients with respect to the backbone, each task run alone through "
            f"its own pathway, mean over {first['num_batches']} validation batch(es) ({first['num_images']} images); "
            f"a negative cosine is a conflict (PCGrad). M³ViT's claim is that task-routed experts separate "
            f"conflicting gradients; `m3vit analyze conflicts --run RUN` follows them along training.", "",
            f"![gradient conflicts]({Path(figure).relative_to(base)})", "",
            format_table(["task pair", *with_conflicts], rows, markdown=True), ""]


def _cost_table(results: dict, names: list[str], markdown: bool = False) -> str:
    """Active GFLOPs and CPU latency per setting (each task alone, then all), one column pair per run."""
    rows = [[t] + [results[n][k].get(t) for n in names for k in ("gflops", "latency_ms")]
            for t in results[names[0]]["gflops"]]
    return format_table(["tasks run"] + [f"{n} {k}" for n in names for k in ("GFLOPs", "ms")], rows, markdown=markdown)


def _summary(results: dict, names: list[str], cfg: RunConfig) -> str:
    lines = [metrics_table({n: results[n]["metrics"] for n in names})]
    h, w = cfg.data.size
    lines.append("")
    lines.append(f"Inference cost at {h}x{w}, batch 1, {results[names[0]]['threads']} CPU thread(s) "
                 f"(medians; the models timed side by side, round-robin); 'all' runs every task in one batched "
                 f"pass; GFLOPs are the active compute (routed tokens only, see results.json gflops_executed for "
                 f"padded dispatch):")
    lines.append(_cost_table(results, names))
    if "delta_m" in results and results["delta_m"]["value"] is not None:
        d = results["delta_m"]
        lines.append(f"\nΔm of {d['of']} against {d['baseline']} as the baseline: {d['value']:+.2f}% "
                     f"(mean relative gain of each task's primary metric)")
    return "\n".join(lines)


def _report(results: dict, names: list[str], cfgs, paths, table: str, figures: dict) -> str:
    cfg = cfgs[names[0]]
    h, w = cfg.data.size
    out = [f"# m3vit demo: {' vs '.join(names)}", ""]
    out.append(f"Data: {cfg.data.name} {h}x{w}, {len(build_train_dataset(cfg))} "
               f"training scenes, {cfg.train.steps or cfg.train.epochs} {'steps' if cfg.train.steps else 'epochs'} "
               f"of batch {cfg.train.batch_size} ({cfg.train.optimizer}, lr {cfg.train.lr}, {cfg.train.schedule}); "
               f"evaluated on the {cfg.data.val_split} split with every task through its own pathway.")
    out.append("")
    rows = [[n, results[n]["model"], results[n]["params_m"], results[n]["steps"], results[n]["train_seconds"],
             results[n]["checkpoint"]] for n in names]
    out.append(format_table(["run", "model", "params (M)", "steps", "train s", "checkpoint"], rows, markdown=True))
    out.append("")
    out.append("## Metrics")
    out.append("")
    out.append(metrics_table({n: results[n]["metrics"] for n in names}, markdown=True))
    out.append("")
    if "delta_m" in results and results["delta_m"]["value"] is not None:
        d = results["delta_m"]
        out.append(f"Δm of {d['of']} with {d['baseline']} as the baseline: **{d['value']:+.2f}%**.")
        out.append("")
    out.append("## Inference cost (batch 1, CPU)")
    out.append("")
    out.append(_cost_table(results, names, markdown=True))
    out.append("")
    out.append("A single task runs only its router, the experts it picks and its head; `all` runs every task "
               "in one task-batched pass. GFLOPs are the active compute (each routed token through its k experts); "
               "`gflops_executed` in results.json also counts the rows the batched dispatch pads to the longest "
               "expert queue, which it runs on short queues because that is faster on a CPU.")
    out.append("")
    base = Path(results[names[0]]["checkpoint"]).parents[1]
    if "curves" in figures:
        out += ["## Training curves", "", f"![training curves]({Path(figures['curves']).relative_to(base)})", ""]
    if figures.get("conflicts"):
        out += _conflict_section(results, names, base, figures["conflicts"])
    if figures.get("experts"):
        out += ["## Expert usage per task", ""]
        out += [f"![expert usage]({Path(p).relative_to(base)})" for p in figures["experts"]]
        out.append("")
        for name in names:
            summary = results[name].get("experts", {}).get("summary")
            if summary:
                mutual = ", ".join(f"block {layer['block']} {layer['mutual_information']:.2f}" for layer in summary
                                   if layer.get("mutual_information") is not None)
                out += [f"Task–expert mutual information of {name} (bits; 0: no specialisation, log2 of the "
                        f"number of tasks: each task on its own experts): {mutual}.", ""]
    if figures.get("predictions"):
        out += ["## Sample predictions", ""]
        out += [f"![{t}]({Path(p).relative_to(base)})" for t, p in figures["predictions"].items()]
        out.append("")
    out += ["## Reproduce", "", "```bash"]
    out += [f"m3vit eval --checkpoint {results[n]['checkpoint']}" for n in names]
    out += ["```", ""]
    return "\n".join(out)
