"""Measured latency of the same single-task pathway on this machine, to set beside the simulated FPGA."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..efficiency.latency import measure_latency

__all__ = ["measure_pathway_latency"]


class _BackbonePathway(nn.Module):
    """The backbone of one task's pathway (no decoder), with the interface ``measure_latency`` times."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def resolve_tasks(self, tasks):
        return self.model.resolve_tasks(tasks)

    def forward(self, images: torch.Tensor, tasks: Sequence[str] | None = None):
        return self.model.forward_features(images, tasks)


def measure_pathway_latency(model: nn.Module, img_size: Sequence[int], task: str, *, include_heads: bool = False,
                            device: str = "cpu", repeats: int = 3, warmup: int = 1) -> dict:
    """Median latency (batch 1) of ``task``'s pathway on ``device``: the backbone alone, or the whole
    single-task model (backbone + the task's decoder) with ``include_heads``. The model is moved to
    ``device`` for the measurement and moved back afterwards."""
    task = model.resolve_tasks([task])[0]
    original = next(model.parameters()).device
    target = model.to(device)
    timed = target if include_heads else _BackbonePathway(target)
    try:
        run = measure_latency(timed, tuple(img_size), [[task]], batch_size=1, repeats=repeats, warmup=warmup)[0]
    finally:
        model.to(original)
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "median_ms": run["median_ms"], "min_ms": run["min_ms"], "runs_ms": run["runs_ms"],
            "scope": "backbone + head" if include_heads else "backbone"}
