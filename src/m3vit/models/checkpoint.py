"""Checkpoints as directories: ``model.safetensors`` + ``config.yaml``, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..utils.errors import CheckpointError
from .config import ConfigError, ModelConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_config", "atomic_directory",
           "task_embed_layout_error"]

FORMAT = "m3vit-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


class atomic_directory:
    """Context manager yielding a temporary sibling directory that replaces ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` (a ``MultiTaskModel``) to ``directory`` atomically; returns the path.

    ``config.yaml`` holds the full ``ModelConfig`` (enough to rebuild the model) plus ``extra``.
    """
    cfg: ModelConfig = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict()}
    if extra:
        meta.update(extra)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        with open(tmp / CONFIG, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
    return Path(directory)


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.yaml`` of a checkpoint directory, with clear errors for a bad directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            hint = f"; for a training run folder use {str(directory / 'final')!r}" if (directory / "final").is_dir() else ""
            raise FileNotFoundError(
                f"{str(directory)!r} is not an m3vit checkpoint: {name} is missing "
                f"(expected {WEIGHTS} and {CONFIG}){hint}"
            )
    try:
        meta = yaml.safe_load((directory / CONFIG).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{directory / CONFIG}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise ConfigError(f"{directory / CONFIG} is not an m3vit checkpoint config (format: {FORMAT})")
    return meta


def task_embed_layout_error(where: str, missing, unexpected) -> CheckpointError | None:
    """A clear error when weights and config disagree on where the task embedding lives (one per
    model: ``backbone.task_embed.*``; one per MoE layer: ``...mlp.router.task_embed.*``), else None."""
    per_layer = any(".mlp.router.task_embed." in k for k in unexpected)
    per_model = any(k.startswith("backbone.task_embed.") for k in unexpected)
    if per_layer and any(k.startswith("backbone.task_embed.") for k in missing):
        return CheckpointError(f"{where}: the weights hold one task embedding per MoE layer (m3vit's earlier layout) "
                               f"but the model config has task_embed: model; set task_embed: layer in the model config")
    if per_model and any(".mlp.router.task_embed." in k for k in missing):
        return CheckpointError(f"{where}: the weights hold one task embedding for the model but the model config has "
                               f"task_embed: layer; set task_embed: model in the model config")
    return None


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the model saved in ``directory`` and load its weights; returned in eval mode."""
    from .m3vit import MultiTaskModel

    meta = read_checkpoint_config(directory)
    model = MultiTaskModel(ModelConfig.from_dict(meta["model"]))
    state = load_file(str(Path(directory) / WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    layout = task_embed_layout_error(f"{directory}", missing, unexpected)
    if layout is not None:
        raise layout
    if missing or unexpected:
        raise ConfigError(
            f"{directory}: weights do not match config.yaml (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(map_location).eval()
