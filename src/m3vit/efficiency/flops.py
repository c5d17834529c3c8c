"""FLOPs that see what executes: a real forward under ``torch.utils.flop_counter.FlopCounterMode``.

Only operations that actually run are counted, so an MoE layer counts the experts its tokens were
dispatched to (``S * k`` token-expert pairs), never the idle ones. Attention matmuls inside
``scaled_dot_product_attention`` are counted too (PyTorch's counter has no formula for the CPU flash
kernel; one is registered here). FLOPs are 2 x multiply-accumulates for matmuls and convolutions;
elementwise ops (GELU, norms, softmax, interpolation) are not counted, as is usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import flop_counter as fc

from ..models.config import check_input_size
from ..models.modes import eval_mode
from ..utils.tables import format_table
from ..utils.errors import InputError

__all__ = ["FlopReport", "count_flops", "COMPONENTS"]

COMPONENTS = ("patch_embed", "attention", "dense_mlp", "router", "experts", "decoder", "other")

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CUSTOM = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CUSTOM[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops


@dataclass
class FlopReport:
    """FLOPs of one forward at ``img_size`` and batch ``batch_size``.

    ``gflops``/``gmacs``/``by_component`` are for the forward with all requested ``tasks`` at once
    (the task-batched pass); ``by_task[t]`` is for a forward of task ``t`` alone (its sparse
    pathway), each with ``gflops``, ``gmacs`` and ``by_component`` (GFLOPs).
    ``attention_matmul_gflops`` is the part of ``attention`` spent in QK^T and AV, which
    module-hook counters such as thop do not see. ``params_m``/``backbone_params_m``: parameters of
    the whole model and of its backbone, in millions.
    """

    model: str
    img_size: tuple[int, int]
    batch_size: int
    tasks: list[str]
    gflops: float
    gmacs: float
    by_component: dict[str, float]
    attention_matmul_gflops: float
    params_m: float = 0.0
    backbone_params_m: float = 0.0
    by_task: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["img_size"] = list(self.img_size)
        return out

    def to_text(self) -> str:
        """The report as ``m3vit flops`` prints it: parameters, then GMACs, GFLOPs and the GFLOPs of each
        component per task (and for all tasks at once when there are several)."""
        headers = ["tasks", "GMACs", "GFLOPs"] + list(COMPONENTS)
        rows = [[t, r["gmacs"], r["gflops"]] + [r["by_component"][c] for c in COMPONENTS]
                for t, r in self.by_task.items()]
        if len(self.tasks) > 1:
            rows.append([f"all {len(self.tasks)}", self.gmacs, self.gflops]
                        + [self.by_component[c] for c in COMPONENTS])
        h, w = self.img_size
        return "\n".join([
            f"{self.model}: {self.params_m:.1f} M parameters ({self.backbone_params_m:.1f} M in the backbone)",
            f"{self.model} at {h}x{w}, batch {self.batch_size} (component columns in GFLOPs; FLOPs = 2 x MACs; "
            f"attention includes {self.attention_matmul_gflops:.2f} GFLOPs of QK^T/AV matmuls)",
            format_table(headers, rows, cell=_compact_number),
        ])


def _compact_number(value: float) -> str:
    """A table cell: whole numbers from 100, one decimal from 10, three below."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _component_flops(model, counts: dict[str, dict]) -> dict[str, int]:
    root = type(model).__name__

    def total(name: str) -> int:
        return int(sum(counts.get(f"{root}.{name}", {}).values()))

    parts = dict.fromkeys(COMPONENTS, 0)
    parts["patch_embed"] = total("backbone.patch_embed")
    for i, block in enumerate(model.backbone.blocks):
        parts["attention"] += total(f"backbone.blocks.{i}.attn")
        mlp = total(f"backbone.blocks.{i}.mlp")
        if block.is_moe:
            router = total(f"backbone.blocks.{i}.mlp.router")
            parts["router"] += router
            parts["experts"] += mlp - router
        else:
            parts["dense_mlp"] += mlp
    parts["decoder"] = sum(total(f"heads.{task}") for task in model.heads)
    parts["other"] = int(sum(counts.get("Global", {}).values())) - sum(parts.values())
    return parts


def _measure(model, images: torch.Tensor, tasks: list[str]) -> tuple[int, dict[str, int], int]:
    with torch.no_grad(), fc.FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        model(images, tasks=tasks)
    counts = counter.get_flop_counts()
    attn_matmul = sum(v for k, v in counts.get("Global", {}).items() if "attention" in str(k))
    return counter.get_total_flops(), _component_flops(model, counts), attn_matmul


def _giga(parts: dict[str, int]) -> dict[str, float]:
    return {k: v / 1e9 for k, v in parts.items()}


def count_flops(model, img_size: Sequence[int] | int, tasks: Sequence[str] | str | None = None,
                batch_size: int = 1, seed: int = 0) -> FlopReport:
    """Count the FLOPs of a real forward of ``model`` on a random ``[batch_size, C, H, W]`` input.

    Runs once with all requested tasks and once per task alone; the model's train/eval mode is
    restored afterwards (counting runs in eval mode). ``img_size`` must pass the input-size rule
    (``m3vit.models.config.check_input_size``), checked before anything is allocated.
    """
    cfg = model.config
    img_size = check_input_size(img_size, cfg.patch_size, "img_size", error=InputError)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    tasks = model.resolve_tasks(tasks)
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    images = torch.randn(batch_size, cfg.in_chans, *img_size, generator=gen).to(param.device, param.dtype)
    model.check_images(images)
    with eval_mode(model):
        total, parts, attn = _measure(model, images, tasks)
        by_task = {}
        for task in tasks:
            t_total, t_parts, _ = _measure(model, images, [task])
            by_task[task] = {"gflops": t_total / 1e9, "gmacs": t_total / 2e9, "by_component": _giga(t_parts)}
    return FlopReport(model=cfg.name, img_size=img_size, batch_size=batch_size, tasks=tasks,
                      gflops=total / 1e9, gmacs=total / 2e9, by_component=_giga(parts),
                      attention_matmul_gflops=attn / 1e9,
                      params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                      backbone_params_m=sum(p.numel() for p in model.backbone.parameters()) / 1e6,
                      by_task=by_task)
