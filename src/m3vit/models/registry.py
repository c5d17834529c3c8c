"""Names: the registered model configurations (``register_model``, ``list_models``, ``describe_models``,
``registered_config``), filled with the zoo's (``models/zoo.py``) when first imported, and the known tasks'
default output channels (``resolve_task_channels``). Building a model from a name is ``models/factory.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..tasks.registry import default_task_channels
from .config import ConfigError, ModelConfig
from .zoo import named_configs

__all__ = ["TASK_CHANNELS", "register_model", "list_models", "describe_models", "registered_config",
           "resolve_task_channels"]

#: Default output channels of the known tasks, from the task classes (``Task.default_channels``:
#: PASCAL-Context's 21 semantic classes, 7 human-part labels incl. background, 1-channel saliency and
#: edge logits, 3-channel normals, 1-channel depth).
TASK_CHANNELS: dict[str, int] = default_task_channels()

#: name -> (config without tasks, description): the zoo's, plus any ``register_model`` adds.
_REGISTRY: dict[str, tuple[ModelConfig, str]] = named_configs()


def register_model(name: str, cfg: ModelConfig, description: str = "") -> None:
    """Make ``cfg`` (tasks and image size are given to ``create_model``) buildable as ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (cfg, description)


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    return {name: _REGISTRY[name][1] for name in list_models()}


def registered_config(name: str) -> ModelConfig:
    """The config registered as ``name`` (no tasks, the registered image size); ``ConfigError`` if unknown."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {list_models()}")
    return _REGISTRY[name][0]


def resolve_task_channels(tasks: Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """``tasks`` as ``{name: channels}``; a list may only name known tasks (their default channels)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, Mapping):
        out = {}
        for name, channels in tasks.items():
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ConfigError(f"task {name!r}: output channels must be a positive int, got {channels!r}")
            out[str(name)] = channels
    else:
        unknown = [t for t in tasks if t not in TASK_CHANNELS]
        if unknown:
            raise ConfigError(
                f"unknown task(s) {unknown}; known tasks are {sorted(TASK_CHANNELS)} "
                "(pass a dict {name: channels} for others)"
            )
        out = {t: TASK_CHANNELS[t] for t in dict.fromkeys(tasks)}
    if not out:
        raise ConfigError("at least one task is required")
    return out
