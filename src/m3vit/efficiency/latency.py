"""Wall-clock inference latency, measured the way a deployment would see it (eval, no grad)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from ..models.modes import eval_mode

__all__ = ["measure_latency"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model, img_size: Sequence[int], tasks_list: Sequence[Sequence[str] | None],
                    batch_size: int = 1, repeats: int = 5, warmup: int = 1, seed: int = 0) -> list[dict]:
    """Median latency of ``model(images, tasks=t)`` for every ``t`` in ``tasks_list``.

    The settings are timed round-robin (one run of each per repeat) so that drift in machine load
    affects them alike. Returns one dict per setting: ``tasks``, ``median_ms``, ``min_ms``, ``runs_ms``.
    """
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, model.config.in_chans, *img_size, generator=gen).to(param.device, param.dtype)
    settings = [model.resolve_tasks(t) for t in tasks_list]
    runs: list[list[float]] = [[] for _ in settings]
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            for tasks in settings:
                model(images, tasks=tasks)
        for _ in range(repeats):
            for i, tasks in enumerate(settings):
                _sync(param.device)
                start = time.perf_counter()
                model(images, tasks=tasks)
                _sync(param.device)
                runs[i].append((time.perf_counter() - start) * 1e3)
    return [
        {"tasks": tasks, "median_ms": statistics.median(r), "min_ms": min(r), "runs_ms": r}
        for tasks, r in zip(settings, runs)
    ]
