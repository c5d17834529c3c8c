"""Evaluate an exported ONNX file (float or int8) with m3vit's own evaluator: ``OnnxModel`` wraps an
onnxruntime session in the model interface ``engine.evaluator.evaluate`` uses, ``evaluate_onnx`` runs it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.evaluator import evaluate
from ..models.config import ModelConfig
from ..utils.errors import ConfigError, InputError, one_line
from .onnx_export import METADATA_CONFIG, METADATA_TASK, onnx_session

__all__ = ["OnnxModel", "evaluate_onnx"]


class OnnxModel(nn.Module):
    """An ONNX file written by ``export_onnx`` (or quantised by ``quantize_onnx``) behind the model
    interface: ``model(images, tasks=None) -> {task: Tensor[B, C, H, W]}`` for its one task,
    ``config`` (the exported model's ``ModelConfig`` reduced to that task), ``tasks``, ``resolve_tasks``.

    It runs on the CPU with onnxruntime (``threads`` intra-op threads, default onnxruntime's) and holds
    no weights of its own: one empty parameter tells callers that read the device from
    ``parameters()`` (the evaluator does) that it lives on the CPU. ``eval()``/``train()`` change nothing.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"{self.path} is a folder, not an ONNX file: give the .onnx file in it "
                             f"(e.g. the model.onnx 'm3vit export --onnx' writes)")
        if not self.path.is_file():
            raise InputError(f"ONNX file {self.path} does not exist")
        self.session = onnx_session(self.path, threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_CONFIG not in metadata or METADATA_TASK not in metadata:
            raise InputError(f"{self.path} has no m3vit metadata ({METADATA_CONFIG}, {METADATA_TASK}): evaluate a file "
                             f"written by 'm3vit export --onnx'")
        damaged = f"{self.path}: its m3vit metadata is damaged"
        try:
            config = ModelConfig.from_dict(json.loads(metadata[METADATA_CONFIG]))
        except (json.JSONDecodeError, ConfigError) as exc:  # not JSON, or not a model config
            raise InputError(f"{damaged} ({METADATA_CONFIG}: {one_line(exc)}); export it again with "
                             f"'m3vit export --onnx'") from None
        self.task = metadata[METADATA_TASK]
        if self.task not in config.tasks:
            raise InputError(f"{damaged} ({METADATA_TASK} {self.task!r} is not one of its config's tasks "
                             f"{list(config.tasks)}); export it again with 'm3vit export --onnx'")
        self.config = config.replace(tasks={self.task: config.tasks[self.task]})
        self.tasks = [self.task]
        self.input_name = self.session.get_inputs()[0].name
        self.device_marker = nn.Parameter(torch.zeros(0), requires_grad=False)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, task={self.task!r}"

    def resolve_tasks(self, tasks: str | Sequence[str] | None) -> list[str]:
        """The requested tasks, validated: only this file's task exists."""
        if tasks is None:
            return list(self.tasks)
        tasks = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown or not tasks:
            raise InputError(f"unknown task(s) {unknown or tasks}; this ONNX model's task is {self.task!r}")
        return tasks

    def forward(self, images: Tensor, tasks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        self.resolve_tasks(tasks)
        (out,) = self.session.run(None, {self.input_name: images.detach().float().cpu().contiguous().numpy()})
        return {self.task: torch.from_numpy(out)}


def evaluate_onnx(path: str | os.PathLike, dataset, *, batch_size: int = 8, eval_cfg: Any = None,
                  limit: int | None = None, threads: int | None = None) -> dict[str, dict[str, float]]:
    """``engine.evaluator.evaluate`` of the ONNX file ``path`` on ``dataset``: ``{task: {metric: value}}``."""
    model = OnnxModel(path, threads=threads)
    return evaluate(model, dataset, model.tasks, batch_size=batch_size, eval_cfg=eval_cfg, limit=limit, device="cpu")
