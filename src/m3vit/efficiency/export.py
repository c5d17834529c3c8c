"""Per-task extraction: a standalone single-task model holding only one task's router, head and the
experts that task uses on a calibration set, saved as a normal checkpoint and optionally as ONNX.

``extract_task(model, task, calibration_dataset)`` measures which experts the task's router picks on
the calibration images (``analysis.experts.expert_usage``), keeps per MoE layer the experts whose share
of the task's token -> expert assignments exceeds ``min_usage``, and builds a one-task
``MultiTaskModel`` whose ``ModelConfig`` records the kept experts (``expert_subsets``), so
``load_checkpoint`` rebuilds it. What the extracted model holds:

* the shared backbone (patch embedding, attention, dense MLPs) and task T's head;
* per MoE layer, the kept experts' ``w1/b1/w2/b2`` rows, and top-k over them (``k = min(top_k, kept)``);
* task T's router: for ``multi_gate`` its own gate; for ``task_conditioned`` the shared gate and the
  task-embedding MLP (the model's one, or each layer's own) with its one-hot input reduced to T's
  column (so T's embedding, and its logit offset, are those of the original); for ``shared`` the
  shared gate.

How the gate normalises over fewer experts (``gate_softmax``):

* ``"all"`` (default, exact): the gate keeps every expert's row (a few kilobytes) so the softmax
  still runs over all of them and a kept expert's combine weight is the original probability; top-k
  picks among the kept experts only. With ``min_usage=0`` every expert the task picked on the
  calibration set is kept, so every calibration token picks the same experts with the same weights:
  predictions are identical (bit for bit for multi-gate and shared routers; the task-conditioned
  embedding MLP runs on 1 row instead of T, which may change float rounding, ~1e-7).
* ``"kept"``: the gate keeps only the kept experts' rows: softmax and top-k renormalised over them.
  Smaller, but with V-MoE combine weights (``renormalize=False``) the weights grow when experts are
  removed, so even ``min_usage=0`` changes predictions (not when the model renormalises its top-k
  weights, where the softmax denominator cancels).

A token whose original choice was removed picks its next-best kept expert instead; the report gives
the share of the task's calibration assignments that were rerouted and the metric change.

ONNX (``export_checkpoint(onnx=True)``): the extracted model is also written as ``model.onnx`` by
``m3vit.efficiency.onnx_export`` (MoE layers in the form that keeps top-k sparsity), checked against
PyTorch with onnxruntime, and with ``int8`` quantised to ``model.int8.onnx``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.errors import CheckpointError, ConfigError, DataError, InputError, OutputError
from ..utils.io import OutputKind, atomic_directory, check_replaceable, write_json
from ..data import preprocess
from ..engine.evaluator import evaluate
from ..engine.inference import predict_checked
from ..analysis.experts import expert_usage
from ..models import MultiTaskModel, moe_block_indices
from ..models.checkpoint import CHECKPOINT, CONFIG, WEIGHTS, write_checkpoint_files
from ..models.config import GATE_SOFTMAX
from ..models.modes import eval_mode

__all__ = ["LayerExtraction", "ExtractionReport", "extract_task", "export_checkpoint"]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export.json"
def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds an export: a checkpoint whose config records the ``export`` it came from (a
    trained model's checkpoint does not, and is never replaced by an export)."""
    if not CHECKPOINT.identify(folder):
        return False
    try:
        with open(folder / CONFIG, encoding="utf-8") as f:
            return any(line.startswith("export:") for line in f)
    except (OSError, UnicodeDecodeError):
        return False


#: An export folder: a checkpoint plus the export report and the ONNX graphs (what ``m3vit export`` replaces).
EXPORT = OutputKind("export", CHECKPOINT.files | {REPORT_FILE, ONNX_FILE, INT8_FILE}, _is_export)


@dataclass
class LayerExtraction:
    """One MoE layer of an extraction: the original expert ids kept and removed, the task's share of
    assignments per original expert on the calibration set (None without one), the layer's top-k after
    extraction and the share of the task's assignments that went to removed experts (now rerouted)."""

    block: int
    kept: list[int]
    removed: list[int]
    usage: list[float] | None
    top_k: int
    rerouted_share: float


@dataclass
class ExtractionReport:
    """What an extraction kept and what it cost. ``params_*`` count parameters: ``before`` the whole
    multi-task model, ``pathway`` task T's pathway in it with every expert (router, backbone, head),
    ``after`` the extracted model. ``weight_bytes_*`` are the safetensors tensor payloads; the
    ``file_bytes_*`` are the checkpoint files' sizes when written (``export_checkpoint``). Metrics are
    the task's on the calibration set (None when it has no labels for the task); ``max_abs_diff`` is the
    largest difference between the original task-T pathway's predictions and the extracted model's."""

    task: str
    model: str
    router: str | None
    gate_softmax: str
    min_usage: float
    num_images: int
    layers: list[LayerExtraction]
    params_before: int
    params_pathway: int
    params_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None
    max_abs_diff: float | None = None
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    onnx: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_change(self) -> dict[str, float] | None:
        """``after - before`` per metric (None without metrics)."""
        if self.metrics_before is None or self.metrics_after is None:
            return None
        return {k: self.metrics_after[k] - self.metrics_before[k] for k in self.metrics_before}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metric_change"] = self.metric_change
        out["param_reduction"] = _reduction(self.params_before, self.params_after)
        out["param_reduction_vs_pathway"] = _reduction(self.params_pathway, self.params_after)
        out["weight_bytes_reduction"] = _reduction(self.weight_bytes_before, self.weight_bytes_after)
        if self.file_bytes_before is not None and self.file_bytes_after is not None:
            out["file_bytes_reduction"] = _reduction(self.file_bytes_before, self.file_bytes_after)
        return out

    def to_text(self) -> str:
        """The report as ``m3vit export`` prints it: what was kept per MoE block, parameters and file sizes
        before and after, the calibration metrics and prediction difference, and the ONNX files."""
        data = self.extra.get("data", {})
        normalised_over = "every expert (exact)" if self.gate_softmax == "all" else "the kept experts (renormalised)"
        lines = [f"task {self.task}, {self.num_images} calibration images ({data.get('name')} {data.get('split')}), "
                 f"experts kept above {self.min_usage:g} of the task's assignments, gate softmax over {normalised_over}"]
        for layer in self.layers:
            total = len(layer.kept) + len(layer.removed)
            removed = ("none removed" if not layer.removed else
                       f"removed {' '.join(f'e{e}' for e in layer.removed)}; {layer.rerouted_share:.1%} of "
                       f"assignments rerouted")
            lines.append(f"  block {layer.block}: kept {len(layer.kept)}/{total} experts, top-{layer.top_k} "
                         f"({removed})")
        d = self.to_dict()
        lines.append(f"parameters: {self.params_before / 1e6:.3f} M -> {self.params_after / 1e6:.3f} M "
                     f"({-d['param_reduction']:+.1%}; the task's pathway with every expert: "
                     f"{self.params_pathway / 1e6:.3f} M, {-d['param_reduction_vs_pathway']:+.1%})")
        lines.append(f"file size: {_megabytes(self.file_bytes_before)} -> {_megabytes(self.file_bytes_after)} "
                     f"({-d['file_bytes_reduction']:+.1%})")
        if self.metrics_before is not None:
            change = ", ".join(f"{m} {self.metrics_before[m]:.3f} -> {self.metrics_after[m]:.3f} ({v:+.3f})"
                               for m, v in self.metric_change.items())
            lines.append(f"{self.task} on the calibration set: {change}")
        same = " (identical)" if self.max_abs_diff == 0 else ""
        lines.append(f"max abs prediction difference vs the original pathway: {self.max_abs_diff:.3g}{same}")
        if self.onnx is not None:
            checked = (f"onnxruntime max abs diff {self.onnx['max_abs_diff']:.3g} (<= {self.onnx['tolerance']:g})"
                       if self.onnx["checked"] else "not checked: onnxruntime is not installed")
            lines.append(f"onnx: {self.onnx['file']} ({_megabytes(self.onnx['bytes'])}), {checked}")
            int8 = self.onnx["int8"]
            if int8 is not None:
                lines.append(f"int8 ({int8['method']}): {int8['file']} ({_megabytes(int8['bytes'])}, "
                             f"{int8['size_ratio']:.2f}x the float file), max abs diff vs float on "
                             f"{int8['num_images']} calibration images {int8['max_abs_diff_vs_fp32']:.3g}")
        return "\n".join(lines)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _reduction(before: int, after: int) -> float:
    """Fraction removed: ``1 - after / before``."""
    return 1.0 - after / before if before else 0.0


def _weight_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def _extracted_state(model: MultiTaskModel, task: str, subsets: dict[int, list[int]],
                     gate_softmax: str) -> dict[str, Tensor]:
    """The state dict of the one-task model: shared backbone, task T's head, its router and kept experts."""
    task_index = model.tasks.index(task)
    source = model.state_dict()
    moe_prefixes = {f"backbone.blocks.{b}.mlp." for b in moe_block_indices(model)}
    state = {k: v for k, v in source.items()
             if not k.startswith("heads.") and not any(k.startswith(p) for p in moe_prefixes)}
    state.update({k: v for k, v in source.items() if k.startswith(f"heads.{task}.")})
    if model.backbone.task_embed is not None:
        state["backbone.task_embed.0.weight"] = model.backbone.task_embed.task_input_weight(task_index)
    for block, layer in zip(moe_block_indices(model), model.moe_layers):
        layer_state = layer.extract_task_state(task_index, subsets.get(block), gate_softmax)
        state.update({f"backbone.blocks.{block}.mlp.{k}": v for k, v in layer_state.items()})
    return state


def _calibration_count(dataset, num_images: int | None) -> int:
    if num_images is not None and num_images < 1:
        raise InputError(f"the number of calibration images must be >= 1, got {num_images}")
    count = len(dataset) if num_images is None else min(num_images, len(dataset))
    if count == 0:
        raise DataError("the calibration dataset is empty")
    return count


@torch.no_grad()
def _max_abs_diff(original: MultiTaskModel, extracted: MultiTaskModel, task: str, dataset, count: int,
                  batch_size: int, size) -> float:
    """Largest |original task-T prediction - extracted prediction| over the calibration images."""
    worst = 0.0
    for start in range(0, count, batch_size):
        images = [dataset[i]["image"] for i in range(start, min(start + batch_size, count))]
        a = predict_checked(original, images, [task], size)[task]
        b = predict_checked(extracted, images, [task], size)[task]
        worst = max(worst, float((a - b).abs().max()))
    return worst


def extract_task(model: MultiTaskModel, task: str, calibration_dataset=None, *, min_usage: float = 0.0,
                 num_images: int | None = None, batch_size: int = 8, gate_softmax: str = "all",
                 eval_cfg: Any = None, size=None) -> tuple[MultiTaskModel, ExtractionReport]:
    """A standalone one-task model for ``task`` and a report of what it kept (see the module docstring).

    ``calibration_dataset`` (samples with an ``"image"`` in ``[0, 1]`` and, for the metric change, the
    task's label) decides which experts are kept: per MoE layer those whose share of the task's
    assignments on the first ``num_images`` images (default all) is ``> min_usage``. Without one every
    expert is kept (and ``min_usage`` must be 0). ``size`` is the network input size (default the model's
    ``img_size``); ``eval_cfg`` an ``EvalSection`` for the metric. The extracted model is in eval mode
    on the original's device.
    """
    if not isinstance(model, MultiTaskModel):
        raise TypeError(f"extract_task needs a MultiTaskModel, got {type(model).__name__}")
    cfg = model.config
    if task not in model.tasks:
        raise InputError(f"unknown task {task!r}; this model's tasks are {model.tasks}")
    if not 0.0 <= min_usage < 1.0:
        raise InputError(f"min_usage must be in [0, 1) (a share of the task's expert assignments), got {min_usage}")
    if gate_softmax not in GATE_SOFTMAX:
        raise ConfigError(f"gate_softmax={gate_softmax!r} is not allowed; choose one of {list(GATE_SOFTMAX)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.expert_subsets:
        raise CheckpointError("this model already holds a subset of the experts (it was extracted); "
                         "extract from the original multi-task checkpoint instead")
    layers = model.moe_layers
    size = tuple(cfg.img_size if size is None else size)
    count = 0 if calibration_dataset is None else _calibration_count(calibration_dataset, num_images)
    usage = None
    if layers and calibration_dataset is not None:
        usage = expert_usage(model, calibration_dataset, [task], limit=count, batch_size=batch_size,
                             size=size).fractions[:, 0, :]
    elif layers and min_usage > 0:
        raise InputError("min_usage > 0 needs a calibration dataset to measure which experts the task uses")

    subsets: dict[int, list[int]] = {}
    layer_reports = []
    for l_idx, (block, layer) in enumerate(zip(moe_block_indices(model), layers)):
        experts = range(layer.num_experts)
        row = None if usage is None else [float(u) for u in usage[l_idx]]
        kept = list(experts) if row is None else [e for e in experts if row[e] > min_usage]
        if not kept:
            raise InputError(f"min_usage={min_usage} removes every expert of block {block} (its most used expert "
                             f"takes {max(row):.3f} of task {task!r}'s assignments); use a smaller threshold")
        removed = [e for e in experts if e not in kept]
        if removed:
            subsets[block] = kept
        layer_reports.append(LayerExtraction(
            block=block, kept=kept, removed=removed, usage=row, top_k=min(layer.top_k, len(kept)),
            rerouted_share=0.0 if row is None else float(sum(row[e] for e in removed))))

    new_cfg = cfg.replace(tasks={task: cfg.tasks[task]}, expert_subsets=subsets, gate_softmax=gate_softmax)
    extracted = MultiTaskModel(new_cfg)
    extracted.load_state_dict(_extracted_state(model, task, subsets, gate_softmax), strict=True)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    extracted = extracted.to(device=device, dtype=dtype).eval()

    pathway_state = _extracted_state(model, task, {}, gate_softmax)
    report = ExtractionReport(
        task=task, model=cfg.name, router=cfg.router if layers else None, gate_softmax=gate_softmax,
        min_usage=float(min_usage), num_images=count, layers=layer_reports,
        params_before=sum(p.numel() for p in model.parameters()),
        params_pathway=sum(pathway_state[k].numel() for k, _ in extracted.named_parameters()),
        params_after=sum(p.numel() for p in extracted.parameters()),
        weight_bytes_before=_weight_bytes(model.state_dict().values()),
        weight_bytes_after=_weight_bytes(extracted.state_dict().values()),
    )
    if calibration_dataset is not None:
        with eval_mode(model):
            if task in getattr(calibration_dataset, "tasks", ()):
                options = dict(batch_size=batch_size, size=size, eval_cfg=eval_cfg, limit=count)
                report.metrics_before = evaluate(model, calibration_dataset, [task], **options)[task]
                report.metrics_after = evaluate(extracted, calibration_dataset, [task], **options)[task]
            report.max_abs_diff = _max_abs_diff(model, extracted, task, calibration_dataset, count, batch_size, size)
    return extracted, report


# ----------------------------------------------------------------------------------------------
# Checkpoint to checkpoint
# ----------------------------------------------------------------------------------------------


def _exported_run(run: dict[str, Any], extracted: MultiTaskModel) -> dict[str, Any]:
    """The source run config adapted to the extracted model: its data restricted to the task, its model
    section describing the extracted architecture."""
    from ..engine.checkpoints import default_run_dict

    out = copy.deepcopy(run)
    out["model"] = default_run_dict(extracted)["model"]
    out["model"]["name"] = run.get("model", {}).get("name", out["model"]["name"])
    out.setdefault("data", {})["tasks"] = list(extracted.tasks)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, task: str, out: str | os.PathLike, *,
                      calibration: int | None = 64, min_usage: float = 0.0, gate_softmax: str = "all",
                      onnx: bool = False, int8: str | None = None,
                      batch_size: int | None = None, device: str = "cpu",
                      overrides: list[str] | dict | None = None) -> ExtractionReport:
    """Extract ``task`` from a checkpoint directory into ``out`` (a normal checkpoint directory, written
    atomically, with ``export.json`` and, with ``onnx``, ``model.onnx``).

    The calibration set is the first ``calibration`` images of the checkpoint's run data, validation
    split (``engine.checkpoints.load_run``; ``overrides`` are its ``--set`` keys); ``calibration=None``
    uses the whole split. ``batch_size`` defaults to the run's ``eval.batch_size``. With ``onnx`` the
    graph is checked against PyTorch with onnxruntime when that is installed (max abs diff recorded; more than 1e-4 raises). ``int8`` (a
    method of ``onnx_export.QUANTIZATION_METHODS``; needs ``onnx`` and onnxruntime) also writes
    ``model.int8.onnx``, calibrated (static) on the calibration images, and records both files' sizes
    and the int8 file's max abs difference from the float one on those images.
    """
    from ..engine.builders import build_eval_dataset
    from ..engine.checkpoints import checkpoint_step, load_run
    from ..models.checkpoint import read_checkpoint_config
    from .onnx_export import QUANTIZATION_METHODS

    if int8 is not None and int8 not in QUANTIZATION_METHODS:
        raise ConfigError(f"int8={int8!r} is not a quantisation method; choose one of {list(QUANTIZATION_METHODS)}")
    if int8 is not None and not onnx:
        raise ConfigError("int8 quantises the ONNX file: it needs onnx=True (--onnx)")
    source, out = Path(checkpoint), Path(out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise OutputError(f"--out {out} is the checkpoint being exported (or inside it); choose another folder")
    check_replaceable(out, EXPORT)  # before the work: refuse a folder that is not an m3vit export
    model, run_cfg = load_run(source, overrides, map_location=device)
    if task not in model.tasks:
        raise InputError(f"unknown task {task!r}; the checkpoint's tasks are {model.tasks}")
    dataset = build_eval_dataset(run_cfg, split=run_cfg.data.val_split)
    if task not in dataset.tasks:
        raise DataError(f"the calibration data ({run_cfg.data.name} {run_cfg.data.val_split}) has no labels for "
                         f"task {task!r}; it provides {list(dataset.tasks)}")
    batch_size = run_cfg.eval.batch_size if batch_size is None else batch_size
    extracted, report = extract_task(model, task, dataset, min_usage=min_usage, num_images=calibration,
                                     batch_size=batch_size, gate_softmax=gate_softmax, eval_cfg=run_cfg.eval)
    report.file_bytes_before = (source / WEIGHTS).stat().st_size
    report.extra = {"source": str(source), "source_step": checkpoint_step(source),
                    "data": {"name": run_cfg.data.name, "split": run_cfg.data.val_split}}
    run = _exported_run(read_checkpoint_config(source).get("run") or run_cfg.to_dict(), extracted)
    with atomic_directory(out, EXPORT) as staging:
        write_checkpoint_files(extracted, staging, extra={"run": run, "step": checkpoint_step(source),
                                                   "export": {"task": task, "source": str(source),
                                                              "min_usage": float(min_usage),
                                                              "gate_softmax": gate_softmax}})
        report.file_bytes_after = (staging / WEIGHTS).stat().st_size
        if onnx:
            images = preprocess([dataset[i]["image"] for i in range(report.num_images)],
                                extracted.config.img_size)
            report.onnx = _export_onnx_files(extracted, staging, images, int8, batch_size)
            if report.onnx["checked"] and not report.onnx["max_abs_diff"] <= report.onnx["tolerance"]:
                raise ValueError(f"the ONNX graph differs from PyTorch by {report.onnx['max_abs_diff']:.3g} "
                                 f"(> {report.onnx['tolerance']}); nothing was written to {out}")
        write_json(staging / REPORT_FILE, report.to_dict())
    return report


def _export_onnx_files(extracted: MultiTaskModel, folder: Path, images: Tensor, int8: str | None,
                       batch_size: int) -> dict[str, Any]:
    """Write ``model.onnx`` (and ``model.int8.onnx``) into ``folder``; their part of the report.
    ``images``: the calibration images, ImageNet-normalised at the model's size."""
    from .onnx_export import (INPUT_NAME, ONNX_TOLERANCE, OnnxUnavailable, check_onnx, export_onnx, onnx_session,
                              quantize_onnx)

    onnx_path = export_onnx(extracted, folder / ONNX_FILE)
    info: dict[str, Any] = {"file": ONNX_FILE, "bytes": onnx_path.stat().st_size, "checked": False,
                            "max_abs_diff": None, "tolerance": ONNX_TOLERANCE, "int8": None}
    try:
        info.update(checked=True, max_abs_diff=check_onnx(extracted, onnx_path, images[:4]))
    except OnnxUnavailable:
        if int8 is not None:
            raise
        log.warning("onnxruntime is not installed: %s was not checked against PyTorch", ONNX_FILE)
    if int8 is not None:
        int8_path = quantize_onnx(onnx_path, folder / INT8_FILE, method=int8, calibration=images, batch_size=batch_size)
        fp32, quantized = onnx_session(onnx_path), onnx_session(int8_path)
        worst = 0.0
        for start in range(0, len(images), batch_size):
            batch = {INPUT_NAME: images[start:start + batch_size].numpy()}
            worst = max(worst, float(abs(fp32.run(None, batch)[0] - quantized.run(None, batch)[0]).max()))
        info["int8"] = {"file": INT8_FILE, "bytes": int8_path.stat().st_size, "method": int8,
                        "max_abs_diff_vs_fp32": worst, "num_images": len(images),
                        "size_ratio": int8_path.stat().st_size / info["bytes"]}
    return info
