"""Analyses of saved checkpoints: gradient conflicts of one checkpoint or along a run's ``step-N/``
checkpoints, and two checkpoints compared (expert specialisation and gradient conflicts on the same data).

Each checkpoint is opened with ``m3vit.engine.checkpoints.load_run`` (its model in eval mode and the run
config it was trained with); the data is that run's evaluation split, with ``--set``-style overrides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.builders import build_eval_dataset
from ..engine.checkpoints import checkpoint_step, load_run
from ..engine.run_folder import FINAL, step_checkpoints
from .experts import expert_usage
from ..models.checkpoint import CONFIG, WEIGHTS
from ..utils.errors import CheckpointError, InputError
from .conflicts import ConflictReport, measure_conflicts, pair_label

__all__ = ["run_checkpoints", "checkpoint_conflicts", "run_conflicts", "compare_checkpoints", "compare_text",
           "conflicts_text"]

log = logging.getLogger(__name__)


def run_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, directory)]`` of a training run folder: every complete ``checkpoints/step-N/`` and then
    ``final/`` unless it repeats the last step, sorted by step."""
    run = Path(run_dir)
    found: dict[int, Path] = {}
    for step, path in step_checkpoints(run):
        if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
            found[step] = path
    final = run / FINAL
    if (final / WEIGHTS).is_file() and (final / CONFIG).is_file():
        step = checkpoint_step(final)
        if step is not None and step not in found:
            found[step] = final
    if not found:
        raise CheckpointError(f"{run}: no checkpoint in it (a training run folder holds checkpoints/step-N/ and "
                              f"final/); pass one checkpoint with --checkpoint")
    return sorted(found.items())


def _data_info(cfg, split: str, dataset) -> dict[str, Any]:
    return {**cfg.to_dict()["data"], "split": split, "num_samples": len(dataset)}


def checkpoint_conflicts(checkpoint: str | os.PathLike, overrides: dict | list[str] | None = None, *,
                         tasks: Sequence[str] | None = None, batches: int = 4, batch_size: int | None = None,
                         split: str | None = None, device: str = "cpu") -> ConflictReport:
    """``measure_conflicts`` of a checkpoint on the first ``batches`` batches of its run's evaluation split
    (``batch_size`` default ``eval.batch_size``); the report's ``info`` names the checkpoint, step and data."""
    model, cfg = load_run(checkpoint, overrides, map_location=device)
    split = split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, split=split)
    report = measure_conflicts(model, dataset, tasks, batches=batches,
                               batch_size=cfg.eval.batch_size if batch_size is None else batch_size)
    report.info = {"checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint), "model": model.config.name,
                   "data": _data_info(cfg, split, dataset)}
    return report


def run_conflicts(run_dir: str | os.PathLike, overrides: dict | list[str] | None = None, **options) -> dict[int, ConflictReport]:
    """``{step: checkpoint_conflicts(...)}`` over ``run_checkpoints(run_dir)``: how conflicts evolve in
    training (a run keeps its last ``train.keep_checkpoints`` step checkpoints; raise it to keep more)."""
    return {step: checkpoint_conflicts(path, overrides, **options) for step, path in run_checkpoints(run_dir)}


def _specialisation(model, dataset, tasks, limit, batch_size) -> dict[str, Any] | None:
    if not model.moe_layers:
        return None
    usage = expert_usage(model, dataset, tasks, limit=limit, batch_size=batch_size)
    return {"num_images": usage.num_images, "num_experts": usage.num_experts, "top_k": usage.top_k,
            "layers": [{k: layer[k] for k in ("block", "mutual_information", "mean_jaccard", "mean_shared")}
                       for layer in usage.summary()]}


def compare_checkpoints(first: str | os.PathLike, second: str | os.PathLike,
                        overrides: dict | list[str] | None = None, *, names: Sequence[str] | None = None,
                        batches: int = 4, batch_size: int | None = None, limit: int | None = None,
                        split: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Expert specialisation (task–expert mutual information, mean Jaccard and shared assignments per MoE
    layer; ``None`` for a dense model) and gradient conflicts of two checkpoints, both measured on the
    evaluation split of ``first``'s run config (with ``overrides``) over the tasks they share.

    ``limit`` caps the images of the usage count (default: the whole split), ``batches`` those of the
    conflicts. Returns a JSON-ready dict; ``names`` label the two (default: their paths).
    """
    paths = [Path(first), Path(second)]
    names = list(names) if names is not None else [str(p) for p in paths]
    if len(names) != 2 or names[0] == names[1]:
        raise InputError(f"compare needs two distinct names, got {names}")
    model_a, cfg = load_run(paths[0], overrides, map_location=device)
    model_b, _ = load_run(paths[1], None, map_location=device)
    tasks = [t for t in model_a.tasks if t in model_b.tasks]
    if not tasks:
        raise InputError(f"{paths[0]} ({model_a.tasks}) and {paths[1]} ({model_b.tasks}) share no task to compare")
    split = split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, split=split)
    missing = [t for t in tasks if t not in dataset.tasks]
    if missing:
        raise InputError(f"the evaluation data of {paths[0]} has no labels for task(s) {missing}")
    size = cfg.eval.batch_size if batch_size is None else batch_size
    out: dict[str, Any] = {"names": names, "tasks": tasks, "data": _data_info(cfg, split, dataset), "checkpoints": {}}
    for name, path, model in zip(names, paths, (model_a, model_b)):
        conflicts = measure_conflicts(model, dataset, tasks, batches=batches, batch_size=size)
        out["checkpoints"][name] = {
            "checkpoint": str(path), "step": checkpoint_step(path), "model": model.config.name,
            "router": model.config.router if model.moe_layers else None,
            "specialisation": _specialisation(model, dataset, tasks, limit, size),
            "conflicts": conflicts.to_dict(),
        }
    return out


def compare_text(result: dict[str, Any]) -> str:
    """The comparison as plain-text tables (the CLI's output)."""
    from ..utils.tables import format_table

    def num(v):
        return "-" if v is None else f"{v:+.3f}" if isinstance(v, float) and v < 0 else f"{v:.3f}"

    a, b = result["names"]
    ca, cb = result["checkpoints"][a], result["checkpoints"][b]
    lines = [f"A = {a} ({ca['model']}, step {ca['step']}), B = {b} ({cb['model']}, step {cb['step']}); data: "
             f"{result['data']['name']} {result['data']['split']}, tasks {', '.join(result['tasks'])}", ""]
    spec_a, spec_b = ca["specialisation"], cb["specialisation"]
    if spec_a is None and spec_b is None:
        lines.append("expert specialisation: both models are dense (no MoE layer)")
    else:
        blocks = sorted({layer["block"] for s in (spec_a, spec_b) if s for layer in s["layers"]})

        def layer(spec, block):
            return next((x for x in spec["layers"] if x["block"] == block), {}) if spec else {}

        keys = ("mutual_information", "mean_jaccard", "mean_shared")
        rows = [[f"block {blk}", *(layer(s, blk).get(k) for k in keys for s in (spec_a, spec_b))] for blk in blocks]
        lines.append("expert specialisation (task–expert mutual information in bits; mean pairwise Jaccard of core "
                     "experts; mean shared assignments; '-': dense):")
        lines.append(format_table(["layer", "MI A", "MI B", "Jaccard A", "Jaccard B", "shared A", "shared B"],
                                  rows, cell=num))
    lines.append("")
    conf_a, conf_b = ca["conflicts"], cb["conflicts"]
    pairs = list(conf_a["pairs"])
    rows = [[pair_label(p), conf_a["pairs"][p], conf_b["pairs"].get(p)] for p in pairs]
    rows.append(["mean over pairs", conf_a["mean_pair_cosine"], conf_b["mean_pair_cosine"]])
    rows.append(["conflicting share", conf_a["conflict_fraction"], conf_b["conflict_fraction"]])
    lines.append(f"gradient conflicts (backbone gradient cosine of two tasks' losses, mean over "
                 f"{conf_a['num_batches']} batch(es); < 0 is a conflict):")
    lines.append(format_table(["task pair", "A", "B"], rows, cell=num))
    return "\n".join(lines)


def conflicts_text(reports: dict[int | None, ConflictReport]) -> str:
    """One checkpoint: its cosine matrix; several steps: a row per step with each pair's mean cosine."""
    from ..utils.tables import format_table

    def num(v):
        return "-" if v is None or v != v else f"{v:+.3f}"

    steps = list(reports)
    first = reports[steps[0]]
    if len(steps) == 1:
        rows = [[t] + list(row) for t, row in zip(first.tasks, first.mean_cosine)]
        return "\n".join([
            f"gradient cosine between tasks (backbone; mean over {len(first.batches)} batch(es), "
            f"{first.num_images} images; < 0 is a conflict):",
            format_table(["task"] + first.tasks, rows, cell=num),
            f"conflicting share of (pair, batch): {first.conflict_fraction:.2f}; mean pair cosine "
            f"{first.mean_pair_cosine:+.3f}"])
    pairs = list(first.pairs())
    rows = [[str(step), *[reports[step].pairs().get(p) for p in pairs], reports[step].conflict_fraction]
            for step in steps]
    return "\n".join([f"gradient cosine per task pair along the run ({len(first.batches)} batch(es) per checkpoint):",
                      format_table(["step", *map(pair_label, pairs), "conflicting"], rows, cell=num)])

