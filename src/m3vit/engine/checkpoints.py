"""Open a trained checkpoint for evaluation, inference or analysis: its model and the run config it was trained with.

A checkpoint written by the trainer holds the resolved ``RunConfig`` under ``run`` in its
``config.yaml``. One saved by plain ``save_checkpoint`` has none; then the run config falls back to
the defaults, adapted to the model: synthetic scenes rendered at the model's ``img_size`` with the
model's tasks. Either way ``--set``-style dotted overrides (``data.seed=3``, ``data.val_length=8``,
``data.name=nyud``) say which data to use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS
from ..models import list_models, load_checkpoint
from ..models.checkpoint import read_checkpoint_config
from ..models.config import ConfigError
from .config import RunConfig, apply_overrides, parse_overrides

__all__ = ["load_run", "checkpoint_step", "default_run_dict"]

# ModelConfig fields that a run config's ``model`` section does not hold (they come from the data).
_NOT_OPTIONS = ("name", "tasks", "img_size")


def default_run_dict(model) -> dict[str, Any]:
    """The default run config (as a dict) adapted to ``model``: its architecture, the default dataset (the
    synthetic scenes) at its ``img_size`` and its tasks."""
    cfg = model.config
    options = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_OPTIONS}
    # Every architecture field is given, so any registered name describes the model exactly; keep the
    # model's own name when it is registered (it is only a label here).
    name = cfg.name if cfg.name in list_models() else RunConfig().model.name
    run = RunConfig().to_dict()
    run["model"] = {"name": name, "pretrained": None, **options}
    run["data"].update({"root": None, "size": list(cfg.img_size), "tasks": list(cfg.tasks)})
    return run


def checkpoint_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The training step recorded in a checkpoint's ``config.yaml`` (None when it has none)."""
    step = read_checkpoint_config(checkpoint_dir).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def load_run(checkpoint_dir: str | os.PathLike, overrides: dict[str, Any] | list[str] | None = None,
             map_location: str | torch.device = "cpu"):
    """``(model, run_config)`` of a checkpoint directory; the model is in eval mode on ``map_location``.

    ``overrides`` are dotted keys (a dict, or ``["data.seed=3", ...]`` strings as ``--set`` gives
    them) applied to the checkpoint's run config. The model's architecture is fixed by its weights,
    so ``model.*`` overrides are refused. Errors name the checkpoint and what is wrong.
    """
    directory = Path(checkpoint_dir)
    meta = read_checkpoint_config(directory)  # missing directory / files: FileNotFoundError naming it
    model = load_checkpoint(directory, map_location=map_location)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if k == "model" or k.startswith("model."))
    if fixed:
        raise ConfigError(f"{fixed[0]}: cannot override the model of a trained checkpoint ({directory}); "
                          f"only the data, train and eval sections can be set")

    run = meta.get("run")
    has_run = run is not None
    if has_run:
        if not isinstance(run, dict):
            raise ConfigError(f"{directory / 'config.yaml'}: 'run' must be a mapping of sections, got {run!r}")
        try:
            RunConfig.from_dict(run, source=str(directory))
        except ConfigError as exc:
            raise ConfigError(f"{directory / 'config.yaml'} (run config): {exc}") from None
    else:
        run = default_run_dict(model)
        default_data = run["data"]["name"]
        if "data.name" not in overrides:
            tasks = overrides.get("data.tasks", list(model.tasks))
            tasks = [tasks] if isinstance(tasks, str) else list(tasks or model.tasks)
            foreign = [t for t in tasks if t not in DATASETS[default_data].all_tasks]
            if foreign:
                raise ConfigError(
                    f"{directory}: the checkpoint holds no run config, so its data defaults to {default_data!r}, "
                    f"which has no labels for task(s) {foreign}; say which data to use, e.g. "
                    f"--set data.name=pascal_context --set data.root=DIR")
    return model, RunConfig.from_dict(apply_overrides(run, overrides))  # override errors name the dotted key
