"""Wall-clock inference latency, measured the way a deployment would see it (eval, no grad)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from ..models.modes import eval_mode

__all__ = ["measure_latency", "measure_latency_side_by_side"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model, img_size: Sequence[int], tasks_list: Sequence[Sequence[str] | None],
                    batch_size: int = 1, repeats: int = 5, warmup: int = 1, seed: int = 0) -> list[dict]:
    """Median latency of ``model(images, tasks=t)`` for every ``t`` in ``tasks_list``.

    The settings are timed round-robin (one run of each per repeat) so that drift in machine load
    affects them alike. Returns one dict per setting: ``tasks``, ``median_ms``, ``min_ms``, ``runs_ms``.
    """
    return measure_latency_side_by_side({"model": model}, img_size, tasks_list, batch_size, repeats, warmup,
                                        seed)["model"]


def measure_latency_side_by_side(models: Mapping[str, torch.nn.Module], img_size: Sequence[int],
                                 tasks_list: Sequence[Sequence[str] | None], batch_size: int = 1, repeats: int = 5,
                                 warmup: int = 1, seed: int = 0) -> dict[str, list[dict]]:
    """``measure_latency`` of several models on the same images, all (model, setting) pairs timed round-robin
    in each repeat, so that the models' figures can be compared: ``{name: [one dict per setting]}``."""
    settings, images = {}, {}
    for name, model in models.items():
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        images[name] = torch.randn(batch_size, model.config.in_chans, *img_size, generator=gen).to(param.device,
                                                                                                   param.dtype)
        settings[name] = [model.resolve_tasks(t) for t in tasks_list]
    pairs = [(name, i) for name in models for i in range(len(tasks_list))]
    runs: dict[tuple[str, int], list[float]] = {pair: [] for pair in pairs}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for repeat in range(warmup + repeats):
            for name, i in pairs:
                model, device = models[name], images[name].device
                _sync(device)
                start = time.perf_counter()
                model(images[name], tasks=settings[name][i])
                _sync(device)
                if repeat >= warmup:
                    runs[(name, i)].append((time.perf_counter() - start) * 1e3)
    return {name: [{"tasks": settings[name][i], "median_ms": statistics.median(runs[(name, i)]),
                    "min_ms": min(runs[(name, i)]), "runs_ms": runs[(name, i)]} for i in range(len(tasks_list))]
            for name in models}
