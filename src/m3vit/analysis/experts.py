"""Expert usage: which experts each task's router picks in each MoE layer, and how much the tasks share them.

``expert_usage`` runs every task through its own pathway (``model(images, tasks=[task])``) over a
dataset and counts, per MoE layer, the token -> expert assignments in ``MoE.last_routing["indices"]``
(every token, the class token included, makes ``top_k`` assignments; counted as routed, before any
capacity drop) and sums their combine weights. ``ExpertUsage.overlap()`` compares the tasks, per
layer, in two ways:

* ``jaccard``: Jaccard index |A ∩ B| / |A ∪ B| of the tasks' *core* expert sets, a task's core being
  the fewest experts that together take at least ``threshold`` (default 90%) of its assignments
  (largest first, ties by expert index; two empty sets count as identical);
* ``shared``: the assignment mass two tasks share, Σ_e min(p_e, q_e) = 1 − total-variation distance
  between their usage distributions (1: identical usage, 0: disjoint experts).

Both are symmetric, 1 on the diagonal and in [0, 1]. ``ExpertUsage.mutual_information()`` measures
specialisation as Mod-Squad (Chen et al., CVPR 2023) does: the mutual information, in bits, between the
task and the chosen expert under the observed assignment frequencies (0: every task uses the experts
alike; log2 T: T tasks on disjoint experts with equal shares). ``plot_heatmaps`` draws a task × expert
heatmap per layer (and one figure with every layer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.inference import predict_checked
from ..utils.figures import save_figure
from ..utils.io import OutputFolder, write_json, write_text
from ..models import moe_block_indices
from ..models.modes import eval_mode

__all__ = ["ExpertUsage", "ExpertOverlap", "expert_usage", "plot_heatmaps", "write_usage", "write_summary"]

log = logging.getLogger(__name__)


@dataclass
class ExpertOverlap:
    """Per-layer task × task similarity of expert usage (see the module docstring)."""

    tasks: list[str]
    layers: list[int]
    threshold: float
    jaccard: np.ndarray  # [L, T, T]
    shared: np.ndarray  # [L, T, T]

    def mean_pairwise(self, which: str = "jaccard") -> np.ndarray:
        """``[L]`` mean over the distinct task pairs (NaN with a single task)."""
        matrix = getattr(self, which)
        pairs = list(combinations(range(len(self.tasks)), 2))
        if not pairs:
            return np.full(len(self.layers), np.nan)
        return np.array([np.mean([m[i, j] for i, j in pairs]) for m in matrix])


@dataclass
class ExpertUsage:
    """Routing statistics: ``counts[l, t, e]`` assignments of task ``t``'s tokens to expert ``e`` in MoE
    layer ``l`` (block ``layers[l]``) and ``weight_sums[l, t, e]`` the sum of their combine weights."""

    tasks: list[str]
    layers: list[int]
    num_experts: int
    top_k: int
    num_images: int
    counts: np.ndarray  # int64 [L, T, E]
    weight_sums: np.ndarray  # float64 [L, T, E]

    @property
    def fractions(self) -> np.ndarray:
        """``[L, T, E]`` share of each task's assignments per expert (each ``[l, t]`` row sums to 1)."""
        totals = self.counts.sum(-1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    @property
    def mean_gate_weight(self) -> np.ndarray:
        """``[L, T, E]`` mean combine weight of an assignment to each expert (0 where never chosen)."""
        return np.divide(self.weight_sums, self.counts, out=np.zeros(self.counts.shape), where=self.counts > 0)

    def mutual_information(self) -> np.ndarray:
        """``[L]`` task–expert mutual information per MoE layer, in bits (Mod-Squad's measure).

        From the joint assignment frequencies ``P(t, e) = counts[l, t, e] / Σ_{t,e} counts[l, t, e]``
        (tasks thus weighted by their observed numbers of assignments) with marginals ``P(t) = Σ_e P(t, e)``
        and ``P(e) = Σ_t P(t, e)``::

            MI_l = Σ_{t,e: P(t,e) > 0} P(t, e) · log2( P(t, e) / (P(t) · P(e)) )

        0 when the tasks use the experts in the same proportions, at most ``min(log2 T, log2 E)``;
        ``log2 T`` for T equally weighted tasks on disjoint experts. NaN for a layer with no assignment.
        """
        counts = self.counts.astype(np.float64)
        out = np.full(len(self.layers), np.nan)
        for l_idx, layer in enumerate(counts):
            total = layer.sum()
            if total <= 0:
                continue
            joint = layer / total
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
            nonzero = joint > 0
            out[l_idx] = float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])).sum())
        return np.maximum(out, 0.0, where=~np.isnan(out), out=out)

    def core_experts(self, threshold: float = 0.9) -> list[list[list[int]]]:
        """``[layer][task]`` the fewest experts that together take >= ``threshold`` of the task's
        assignments (largest share first, ties by index); empty for a task with no assignment."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        out = []
        for layer in self.fractions:
            per_task = []
            for row in layer:
                if row.sum() == 0:
                    per_task.append([])
                    continue
                order = sorted(range(len(row)), key=lambda e: (-row[e], e))
                chosen, mass = [], 0.0
                for e in order:
                    chosen.append(e)
                    mass += row[e]
                    if mass >= threshold - 1e-12:
                        break
                per_task.append(sorted(chosen))
            out.append(per_task)
        return out

    def overlap(self, threshold: float = 0.9) -> ExpertOverlap:
        """Per-layer task × task Jaccard of the core expert sets and shared assignment mass."""
        cores = self.core_experts(threshold)
        fractions = self.fractions
        num_tasks = len(self.tasks)
        jaccard = np.ones((len(self.layers), num_tasks, num_tasks))
        shared = np.ones((len(self.layers), num_tasks, num_tasks))
        for l_idx in range(len(self.layers)):
            for i in range(num_tasks):
                for j in range(i + 1, num_tasks):
                    a, b = set(cores[l_idx][i]), set(cores[l_idx][j])
                    jac = len(a & b) / len(a | b) if a | b else 1.0
                    mass = float(np.minimum(fractions[l_idx, i], fractions[l_idx, j]).sum())
                    jaccard[l_idx, i, j] = jaccard[l_idx, j, i] = jac
                    shared[l_idx, i, j] = shared[l_idx, j, i] = mass
        return ExpertOverlap(list(self.tasks), list(self.layers), threshold, jaccard, shared)

    def summary(self, threshold: float = 0.9, top: int = 3) -> list[dict[str, Any]]:
        """Per layer: the core experts of each task, mean pairwise overlaps and the experts in the most
        tasks' cores (``top`` of them, with how many tasks share each)."""
        cores = self.core_experts(threshold)
        ov = self.overlap(threshold)
        jac, shared = ov.mean_pairwise("jaccard"), ov.mean_pairwise("shared")
        mutual = self.mutual_information()
        out = []
        for l_idx, block in enumerate(self.layers):
            in_cores = np.zeros(self.num_experts, dtype=int)
            for core in cores[l_idx]:
                in_cores[core] += 1
            total_share = self.fractions[l_idx].sum(0)
            ranked = sorted(range(self.num_experts), key=lambda e: (-in_cores[e], -total_share[e], e))
            out.append({
                "block": block,
                "core_experts": {t: cores[l_idx][i] for i, t in enumerate(self.tasks)},
                "mean_jaccard": None if np.isnan(jac[l_idx]) else float(jac[l_idx]),
                "mean_shared": None if np.isnan(shared[l_idx]) else float(shared[l_idx]),
                "mutual_information": None if np.isnan(mutual[l_idx]) else float(mutual[l_idx]),
                "most_shared": [{"expert": int(e), "tasks": int(in_cores[e])} for e in ranked[:top] if in_cores[e] > 0],
            })
        return out

    def to_text(self, threshold: float = 0.9) -> str:
        """Per MoE block, as ``m3vit experts`` prints it: each task's core experts, then the tasks' mean
        pairwise overlap and the most shared experts, and the task–expert mutual information."""
        lines = []
        for layer in self.summary(threshold):
            cores = ", ".join(f"{t} {len(c)} ({' '.join(f'e{e}' for e in c)})"
                              for t, c in layer["core_experts"].items())
            lines.append(f"block {layer['block']}: core experts per task: {cores}")
            if layer["mean_jaccard"] is not None:
                shared = ", ".join(f"e{s['expert']} ({s['tasks']} tasks)" for s in layer["most_shared"])
                lines.append(f"  mean pairwise overlap: Jaccard {layer['mean_jaccard']:.2f}, shared assignments "
                             f"{layer['mean_shared']:.2f}; most shared: {shared or '-'}")
            if layer["mutual_information"] is not None:
                lines.append(f"  task–expert mutual information: {layer['mutual_information']:.3f} bits "
                             f"(0: no specialisation; log2 of the number of tasks: each task on its own experts)")
        return "\n".join(lines)

    def to_markdown(self, threshold: float = 0.9) -> str:
        """A Markdown summary: per layer, each task's core experts and the two overlap matrices."""
        ov = self.overlap(threshold)
        lines = [f"# Expert usage: {len(self.tasks)} task(s), {self.num_images} image(s), top-{self.top_k} of "
                 f"{self.num_experts} experts", "",
                 f"Core experts: the fewest experts taking >= {threshold:.0%} of a task's token→expert assignments. "
                 f"Jaccard: |A∩B| / |A∪B| of two tasks' cores. Shared: Σ_e min(p_e, q_e) of their usage "
                 f"distributions (1 − total variation). Mutual information: between the task and the chosen "
                 f"expert under the observed assignment frequencies, in bits (0: no specialisation; at most "
                 f"log2 T = {np.log2(max(len(self.tasks), 1)):.2f} for these {len(self.tasks)} task(s)).", ""]
        header = "| | " + " | ".join(self.tasks) + " |"
        rule = "|---|" + "---|" * len(self.tasks)
        for l_idx, layer in enumerate(self.summary(threshold)):
            lines += [f"## Block {layer['block']}", ""]
            lines += [f"- {t}: {len(c)} core expert(s) {c}" for t, c in layer["core_experts"].items()]
            if layer["mutual_information"] is not None:
                lines.append(f"- task–expert mutual information: {layer['mutual_information']:.3f} bits")
            if layer["most_shared"]:
                lines.append("- most shared: " + ", ".join(f"expert {s['expert']} ({s['tasks']} tasks)"
                                                           for s in layer["most_shared"]))
            matrices = (("Jaccard of core experts", ov.jaccard[l_idx]), ("Shared assignments", ov.shared[l_idx]))
            for name, matrix in matrices:
                lines += ["", f"{name}:", "", header, rule]
                lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                          for t, row in zip(self.tasks, matrix)]
            lines.append("")
        return "\n".join(lines)

    def to_dict(self, threshold: float = 0.9) -> dict[str, Any]:
        """JSON-ready: raw counts, fractions, mean gate weights, overlaps and the summary, per layer."""
        ov = self.overlap(threshold)
        fractions, gates = self.fractions, self.mean_gate_weight
        mutual = self.mutual_information()
        return {
            "tasks": list(self.tasks),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_images": self.num_images,
            "threshold": threshold,
            "overlap_measures": {
                "jaccard": f"Jaccard index of the sets of experts covering >= {threshold:.0%} of each task's "
                           f"assignments",
                "shared": "sum over experts of min(p, q): 1 - total-variation distance of the usage distributions",
                "mutual_information": "MI in bits between the task and the chosen expert under the joint assignment "
                                      "frequencies P(t, e) = counts / total (Mod-Squad)",
            },
            "layers": [
                {
                    "block": block,
                    "counts": {t: self.counts[l_idx, i].tolist() for i, t in enumerate(self.tasks)},
                    "fractions": {t: fractions[l_idx, i].tolist() for i, t in enumerate(self.tasks)},
                    "mean_gate_weight": {t: gates[l_idx, i].tolist() for i, t in enumerate(self.tasks)},
                    "jaccard": ov.jaccard[l_idx].tolist(),
                    "shared": ov.shared[l_idx].tolist(),
                    "mutual_information": None if np.isnan(mutual[l_idx]) else float(mutual[l_idx]),
                }
                for l_idx, block in enumerate(self.layers)
            ],
            "summary": self.summary(threshold),
        }


@torch.no_grad()
def expert_usage(model, dataset, tasks: Sequence[str] | None = None, *, limit: int | None = None,
                 batch_size: int = 8, size: Sequence[int] | None = None,
                 progress: bool = False) -> ExpertUsage:
    """Count each task's token -> expert assignments per MoE layer over ``dataset`` (images in ``[0, 1]``,
    resized to ``size``, default the model's ``img_size``), each task run through its own pathway.

    ``limit`` uses the first N samples. A dense model (no MoE layer) raises ``ValueError``.
    """
    layers = model.moe_layers
    if not layers:
        raise ValueError(f"model {model.config.name!r} has no MoE layer (it is dense): there is no expert "
                         f"usage to measure")
    tasks = model.resolve_tasks(tasks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    size = tuple(model.config.img_size if size is None else size)
    # Usage is reported over the router's experts: a layer holding a subset (an extracted task,
    # ``m3vit export``) has its held experts' indices mapped back to their original ids.
    num_experts = layers[0].router_experts
    original_ids = [None if layer.expert_ids is None else torch.tensor(layer.expert_ids) for layer in layers]
    counts = np.zeros((len(layers), len(tasks), num_experts), dtype=np.int64)
    weight_sums = np.zeros((len(layers), len(tasks), num_experts), dtype=np.float64)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError("the dataset is empty")
    starts = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="experts", unit="batch", leave=False)

    def record(task: str) -> None:  # right after the task's forward: its routing is in last_routing
        t_idx = tasks.index(task)
        for l_idx, layer in enumerate(layers):
            routing = layer.last_routing
            indices = routing["indices"].reshape(-1).cpu()
            if original_ids[l_idx] is not None:
                indices = original_ids[l_idx][indices]
            weights = routing["weights"].reshape(-1).double().cpu()
            counts[l_idx, t_idx] += torch.bincount(indices, minlength=num_experts).numpy()
            weight_sums[l_idx, t_idx] += torch.zeros(num_experts, dtype=torch.float64).index_add_(
                0, indices, weights).numpy()

    with eval_mode(model):
        for start in starts:
            predict_checked(model, [dataset[i]["image"] for i in range(start, min(start + batch_size, count))],
                            tasks, size, after_task=record)
    return ExpertUsage(tasks=list(tasks), layers=moe_block_indices(model), num_experts=num_experts,
                       top_k=max(layer.top_k for layer in layers), num_images=count, counts=counts,
                       weight_sums=weight_sums)


def _heatmap(ax, values: np.ndarray, tasks: list[str], title: str, annotate: bool) -> Any:
    image = ax.imshow(values * 100, cmap="viridis", vmin=0, vmax=max(1e-9, float(values.max()) * 100), aspect="auto")
    ax.set_yticks(range(len(tasks)), labels=tasks)
    num_experts = values.shape[1]
    step = 1 if num_experts <= 32 else max(1, num_experts // 16)
    ax.set_xticks(range(0, num_experts, step))
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    if annotate:
        top = float(values.max())
        for t in range(values.shape[0]):
            for e in range(num_experts):
                v = values[t, e]
                ax.text(e, t, f"{v * 100:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * top else "white")
    return image


def heatmap_names(usage: ExpertUsage) -> list[str]:
    """The file names ``plot_heatmaps`` writes."""
    return [f"experts_block{block}.png" for block in usage.layers] + ["experts_all.png"]


def plot_heatmaps(usage: ExpertUsage, out: str | os.PathLike | Callable[[str], Path],
                  threshold: float = 0.9) -> list[Path]:
    """Write ``experts_block<i>.png`` per MoE layer (task × expert, % of each task's assignments,
    annotated) and ``experts_all.png`` with every layer; returns the paths. ``write_summary`` adds the
    overlap matrices as Markdown.

    ``out`` is a folder (used as an ``OutputFolder``: a file there that m3vit did not write is never
    replaced) or a function giving the path for each file name (a caller's own ``OutputFolder.path``).
    """
    if not callable(out):
        with OutputFolder(out, kind="experts") as folder:
            folder.claim(heatmap_names(usage))
            return plot_heatmaps(usage, folder.path, threshold)
    from matplotlib.figure import Figure

    fractions = usage.fractions
    ov = usage.overlap(threshold)
    jac, shared = ov.mean_pairwise("jaccard"), ov.mean_pairwise("shared")
    mutual = usage.mutual_information()
    annotate = usage.num_experts <= 32
    width = max(5.0, 0.42 * usage.num_experts + 2.5)
    height_per = 0.35 * len(usage.tasks) + 1.4
    paths = []
    for l_idx, block in enumerate(usage.layers):
        fig = Figure(figsize=(width, height_per + 0.4), layout="constrained")
        ax = fig.add_subplot()
        overlap_text = "" if np.isnan(jac[l_idx]) else (f"\nmean pairwise overlap: Jaccard {jac[l_idx]:.2f}, "
                                                         f"shared assignments {shared[l_idx]:.2f}; task–expert MI "
                                                         f"{mutual[l_idx]:.2f} bits")
        image = _heatmap(ax, fractions[l_idx], usage.tasks,
                         f"block {block}: % of each task's token→expert assignments (top-{usage.top_k})"
                         f"{overlap_text}", annotate)
        fig.colorbar(image, ax=ax, label="%")
        paths.append(Path(save_figure(fig, out(f"experts_block{block}.png"), dpi=110)))
    fig = Figure(figsize=(width, height_per * len(usage.layers) + 0.4), layout="constrained")
    axes = fig.subplots(len(usage.layers), 1, squeeze=False)[:, 0]
    for l_idx, block in enumerate(usage.layers):
        _heatmap(axes[l_idx], fractions[l_idx], usage.tasks, f"block {block}", annotate)
    fig.suptitle(f"expert usage per task (% of assignments, {usage.num_images} images)", fontsize=11)
    paths.append(Path(save_figure(fig, out("experts_all.png"), dpi=110)))
    return paths


def write_summary(usage: ExpertUsage, path: str | os.PathLike, threshold: float = 0.9) -> Path:
    """Write ``usage.to_markdown()`` to ``path``, atomically."""
    return write_text(path, usage.to_markdown(threshold))


def write_usage(usage: ExpertUsage, path: str | os.PathLike, threshold: float = 0.9, extra: dict | None = None) -> Path:
    """Write ``usage.to_dict()`` (plus ``extra``) as JSON, atomically."""
    return write_json(path, {**(extra or {}), **usage.to_dict(threshold)})
