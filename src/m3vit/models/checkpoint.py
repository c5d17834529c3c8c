"""Checkpoints as directories: ``model.safetensors`` + ``config.yaml``, written atomically.

A checkpoint folder holds nothing but ``CHECKPOINT_FILES`` and its ``config.yaml`` carries the format
marker ``m3vit-checkpoint``: that is how m3vit recognises its own checkpoints, the only folders
``save_checkpoint`` replaces (``m3vit.utils.io``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..utils.errors import CheckpointError
from ..utils.io import OutputKind, atomic_directory, write_bytes, write_text
from .config import ConfigError, ModelConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_config", "write_checkpoint_files",
           "is_checkpoint_config", "task_embed_layout_error", "CHECKPOINT", "CHECKPOINT_FILES", "WEIGHTS",
           "CONFIG", "TRAINER_STATE"]

FORMAT = "m3vit-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
#: The trainer's state beside a step checkpoint's model (optimizer, schedule, RNG, data order).
TRAINER_STATE = "trainer.pt"
CHECKPOINT_FILES = frozenset({WEIGHTS, CONFIG, TRAINER_STATE})


def is_checkpoint_config(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.yaml`` carries m3vit's checkpoint format marker (read as text: cheap, safe)."""
    try:
        with open(Path(folder) / CONFIG, encoding="utf-8") as f:
            return any(line.strip() == f"format: {FORMAT}" for line in f)
    except (OSError, UnicodeDecodeError):
        return False


#: A checkpoint folder, for ``m3vit.utils.io.atomic_directory``.
CHECKPOINT = OutputKind("checkpoint", CHECKPOINT_FILES, is_checkpoint_config)


def write_checkpoint_files(model, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` of ``model`` into the (temporary) ``folder``.

    ``config.yaml`` holds the full ``ModelConfig`` (enough to rebuild the model) plus ``extra``. The
    weights are serialised in memory first, so a full disk is an ``OSError`` (``OutputError``), never a
    half-written file that looks whole.
    """
    folder = Path(folder)
    cfg: ModelConfig = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict()}
    if extra:
        meta.update(extra)
    write_bytes(folder / WEIGHTS, safetensors_bytes(state, metadata={"format": FORMAT}), durable=True)
    write_text(folder / CONFIG, yaml.safe_dump(meta, sort_keys=False))
    return folder


def save_checkpoint(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` (a ``MultiTaskModel``) to the folder ``directory`` atomically; returns the path.

    ``directory`` must be free, empty, or an m3vit checkpoint (which is replaced); anything else (a
    folder of other files, a plain file) is refused with an ``OutputError`` and left untouched.
    """
    with atomic_directory(directory, CHECKPOINT) as tmp:
        write_checkpoint_files(model, tmp, extra)
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
