"""Checkpoints as directories: ``model.safetensors`` + ``config.yaml``, written atomically and verified before use.

A checkpoint folder holds nothing but ``CHECKPOINT_FILES`` and its ``config.yaml`` carries the format
marker ``m3vit-checkpoint``: that is how m3vit recognises its own checkpoints, the only folders
``save_checkpoint`` replaces (``m3vit.utils.io``).

``verify_checkpoint`` checks a directory without allocating the model: ``config.yaml`` must parse and hold a
valid model config, the safetensors header must describe the file exactly, and the tensors it lists must be
those of the model the config describes (built on the ``meta`` device), name for name and shape for shape.
``load_checkpoint`` verifies, builds the model on ``meta`` and reads each tensor into its own storage, so its
peak memory is one copy of the weights. Every damaged checkpoint raises a ``CheckpointError`` naming the
file and what is wrong; a missing directory or file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..utils.errors import CheckpointError
from ..utils.io import OutputKind, atomic_directory, write_bytes, write_text
from ..utils.safetensors_layout import TensorEntry, read_safetensors_layout, read_tensor_into
from .config import ConfigError, ModelConfig
from .m3vit import MultiTaskModel

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_config", "write_checkpoint_files",
           "verify_checkpoint", "VerifiedCheckpoint", "build_on_meta", "read_weights_into", "TensorsOnMeta",
           "is_checkpoint_config", "task_embed_layout_error", "CHECKPOINT", "CHECKPOINT_FILES", "WEIGHTS",
           "CONFIG", "TRAINER_STATE", "torch_load_failure"]

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


class TensorsOnMeta(TorchFunctionMode):
    """Tensor factories called without a device create ``meta`` tensors: modules get built without memory.

    ``torch.device("meta")`` alone would also put ``torch.linspace`` on meta, and the backbone turns one
    into Python floats (its drop-path rates), which a meta tensor cannot give; so only the factories
    that module constructors use for parameters and buffers are redirected (``torch.tensor``, which builds
    small non-persistent buffers from the config such as ``MoE._selectable``, stays real). In-place
    initialisers (``normal_``, ``trunc_normal_``, ``zero_``, ...) on meta tensors are skipped: there is
    nothing to fill, and some of them would otherwise pull in torch's Python meta kernels (~70 MB of modules).
    """

    _FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if name.endswith("_") and not name.endswith("__") and isinstance(target, Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_on_meta(cfg: ModelConfig) -> MultiTaskModel:
    """The ``MultiTaskModel`` of ``cfg`` with every parameter and persistent buffer on ``meta`` (no storage, so
    any size is free to build); what ``TensorsOnMeta`` leaves real is small and rebuilt from the config."""
    with TensorsOnMeta():
        return MultiTaskModel(cfg)


def torch_load_failure(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` could not read ``path``, in m3vit's words (torch's own message
    spans lines and advises loading with ``weights_only=False``, which runs the file's code)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return "it is empty"
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (legacy: a pickle, protocol >= 2)
        return "it is neither a torch.save archive nor a pickle"
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects besides tensors, or is a pickle torch.save did not write"
    if isinstance(exc, EOFError):
        return "it is truncated"
    if head == b"PK" and isinstance(exc, RuntimeError):
        return "it is a damaged or foreign zip archive"
    return f"torch.load failed with {type(exc).__name__}"


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
    """The parsed ``config.yaml`` of a checkpoint directory (its ``model`` a mapping; not yet validated).

    A missing directory or file is a ``FileNotFoundError`` naming it (with a hint for a training run
    folder); a file given for the directory, a ``config.yaml`` that is not YAML or not an m3vit checkpoint
    config, or one of a format ``version`` newer than ``VERSION`` is a ``CheckpointError``. A config without
    a ``version`` (or of an older one) is read as it is.
    """
    directory = Path(directory)
    if directory.is_file():
        parent = directory.parent
        hint = f"; give {str(parent)!r}" if all((parent / name).is_file() for name in (WEIGHTS, CONFIG)) else ""
        raise CheckpointError(f"{str(directory)!r} is a file, not a checkpoint: a checkpoint is the folder holding "
                              f"{WEIGHTS} and {CONFIG}{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            hint = f"; for a training run folder use {str(directory / 'final')!r}" if (directory / "final").is_dir() else ""
            raise FileNotFoundError(
                f"{str(directory)!r} is not an m3vit checkpoint: {name} is missing "
                f"(expected {WEIGHTS} and {CONFIG}){hint}"
            )
    path = directory / CONFIG
    try:
        meta = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:  # the YAML reader's failures
        raise CheckpointError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an m3vit checkpoint config (format: {FORMAT})")
    version = meta.get("version")  # none before versions were written: read as version 1
    if version is not None:
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: 'version' must be an integer (the checkpoint format version; this m3vit "
                                  f"writes {VERSION}), got {version!r:.60}")
        if version > VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this m3vit reads "
                                  f"(version {VERSION}); upgrade m3vit to load it")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' must be the mapping of the model's config, "
                              f"got {meta.get('model')!r:.60}")
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


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint directory that ``verify_checkpoint`` passed: its parsed ``config.yaml`` (``meta``), the
    validated model ``config`` and the ``layout`` of its weights file (tensor name -> dtype, shape, bytes)."""

    directory: Path
    meta: dict
    config: ModelConfig
    layout: dict[str, TensorEntry]

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG


def verify_checkpoint(directory: str | os.PathLike) -> VerifiedCheckpoint:
    """Check a checkpoint directory without allocating its model or reading its tensors.

    ``config.yaml`` must be an m3vit checkpoint config whose ``model`` is a valid ``ModelConfig`` with at
    least one task; ``model.safetensors`` must have a well-formed header that covers the file exactly
    (``utils.safetensors_layout``); and its tensors must be the model's state dict, built on ``meta``:
    the same names, the same shapes, and each dtype the model's or, for floating-point tensors, another
    floating-point one (widened or narrowed on load). Raises ``FileNotFoundError`` for a missing directory
    or file and ``CheckpointError`` naming the file and the first mismatches for anything else.
    """
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: model: {exc}") from None
    if not cfg.tasks:
        raise CheckpointError(f"{config_path}: model.tasks is empty (a checkpoint's model has at least one task)")
    layout = read_safetensors_layout(weights_path)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in build_on_meta(cfg).state_dict().items()}
    _check_tensors(weights_path, layout, expected)
    return VerifiedCheckpoint(directory, meta, cfg, layout)


def _listed(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _check_tensors(weights_path: Path, layout: dict[str, TensorEntry],
                   expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Names, shapes and dtypes of the file's tensors against the model's state dict."""
    where = f"{weights_path}: the weights do not match {CONFIG}"
    missing = [n for n in expected if n not in layout]
    unexpected = [n for n in layout if n not in expected]
    if missing or unexpected:
        layout_error = task_embed_layout_error(str(weights_path), missing, unexpected)
        if layout_error is not None:
            raise layout_error
        parts = ([f"missing {_listed(missing)}"] if missing else []) + (
            [f"unexpected {_listed(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where} ({'; '.join(parts)})")
    wrong = []
    for name, (shape, dtype) in expected.items():
        entry = layout[name]
        if entry.shape != shape:
            wrong.append(f"{name} is {list(entry.shape)} in the file, {list(shape)} in the config")
        elif entry.dtype != dtype and not (entry.dtype.is_floating_point and dtype.is_floating_point):
            wrong.append(f"{name} is {entry.dtype} in the file, {dtype} in the model")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{where}: {wrong[0]}{more}")


def _materialise(model: nn.Module, device: torch.device) -> set[str]:
    """Give every meta parameter and buffer uninitialised storage on ``device`` (the state dict's entries are
    read from the file next); tensors already real move to ``device`` (non-persistent buffers built from the
    config), and those already there are kept as they are (a live model's parameters stay the same objects).

    Not ``Module.to_empty``: ``empty_like`` of a meta tensor runs torch's Python meta kernels, whose
    first use imports ~70 MB of modules (sympy among them) into the process. Returns the names of the
    tensors that were on meta (each must then be read from the file).
    """
    were_meta: set[str] = set()

    def real(qualified: str, t: Tensor) -> Tensor:
        if not t.is_meta:
            return t.to(device)  # ``t`` itself when it is on ``device`` already
        were_meta.add(qualified)
        return torch.empty(t.shape, dtype=t.dtype, device=device)

    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in list(module.named_parameters(recurse=False)):
            new = real(dot + name, param)
            if new is not param:
                setattr(module, name, nn.Parameter(new.detach(), requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            new = real(dot + name, buffer)
            if new is not buffer:
                setattr(module, name, new)
    return were_meta


def read_weights_into(model: nn.Module, verified: VerifiedCheckpoint, device: str | torch.device) -> None:
    """Fill ``model`` from a verified checkpoint of its config: every meta tensor (a model from
    ``build_on_meta``, possibly with layers swapped) gets storage on ``device``, and every state-dict entry
    is read from the weights file at the offsets of ``verified.layout`` into the tensor's own storage (cast
    to its dtype), one tensor at a time. A live model on ``device`` keeps its parameter objects (an
    optimizer built on them stays valid). File tensors the model does not hold (the experts a streaming
    model leaves in the file) are not read."""
    device = torch.device(device)
    uninitialised = _materialise(model, device)
    state = model.state_dict(keep_vars=True)
    not_in_state = sorted(uninitialised - set(state))
    missing = sorted(set(state) - set(verified.layout))
    if not_in_state or missing:  # verify_checkpoint compared the state dict with the file: a bug if reached
        raise RuntimeError(f"{verified.directory}: {(not_in_state + missing)[:3]} are neither in the weights file "
                           f"nor rebuilt from the config")
    fd = os.open(verified.weights_path, os.O_RDONLY)
    try:
        for name, tensor in state.items():
            read_tensor_into(fd, verified.weights_path, verified.layout[name], tensor.data)
    finally:
        os.close(fd)


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the model saved in ``directory`` and load its weights; returned in eval mode.

    The checkpoint is verified first (``verify_checkpoint``: nothing is allocated for a config that does
    not match its weights); the model is then built on ``meta`` and each tensor read from the file into
    its own storage on ``map_location`` (``read_weights_into``), so the peak memory is one copy of the
    weights plus one tensor, and the model does not depend on the file afterwards. Errors: as
    ``verify_checkpoint``.
    """
    verified = verify_checkpoint(directory)
    model = build_on_meta(verified.config)
    read_weights_into(model, verified, map_location)
    return model.eval()
