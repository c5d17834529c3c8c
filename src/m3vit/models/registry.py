"""Registry of named model configurations: ``create_model(name, tasks, img_size, **overrides)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..tasks.registry import default_task_channels
from .config import ConfigError, ModelConfig

__all__ = ["TASK_CHANNELS", "register_model", "list_models", "create_model", "model_config", "resolve_task_channels"]

#: Default output channels of the known tasks, from the task classes (``Task.default_channels``:
#: PASCAL-Context's 21 semantic classes, 7 human-part labels incl. background, 1-channel saliency and
#: edge logits, 3-channel normals, 1-channel depth).
TASK_CHANNELS: dict[str, int] = default_task_channels()

_REGISTRY: dict[str, tuple[ModelConfig, str]] = {}


def register_model(name: str, cfg: ModelConfig, description: str = "") -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (cfg, description)


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    return {name: _REGISTRY[name][1] for name in list_models()}


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


def model_config(name: str, tasks, img_size=(512, 512), **overrides) -> ModelConfig:
    """The validated config ``create_model`` would build."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {list_models()}")
    base = _REGISTRY[name][0]
    return base.replace(tasks=resolve_task_channels(tasks), img_size=img_size, **overrides)


def create_model(name: str, tasks, img_size=(512, 512), pretrained=None, **overrides):
    """Build a registered multi-task model.

    ``tasks`` maps task name -> output channels, or lists known task names (``TASK_CHANNELS``).
    ``img_size`` sets the positional-embedding grid (other sizes divisible by the patch size are
    interpolated at run time). ``overrides`` replace any ``ModelConfig`` field, e.g.
    ``num_experts``, ``top_k``, ``expert_ratio``, ``router``, ``moe_blocks``, ``noise_std``,
    ``head_channels``. ``pretrained`` names a local DeiT/timm ViT checkpoint to initialise the
    backbone from (see ``m3vit.models.pretrained``).
    """
    from .m3vit import MultiTaskModel

    model = MultiTaskModel(model_config(name, tasks, img_size, **overrides))
    if pretrained is not None:
        from .pretrained import load_pretrained_vit

        load_pretrained_vit(model, pretrained)
    return model
