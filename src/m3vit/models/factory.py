"""Build a model by name: ``model_config`` (the validated config of a registered name with tasks, image size
and overrides) and ``create_model`` (that config's ``MultiTaskModel``, optionally from pretrained weights)."""

from __future__ import annotations

from .config import ModelConfig
from .m3vit import MultiTaskModel
from .pretrained import load_pretrained_vit
from .registry import registered_config, resolve_task_channels

__all__ = ["model_config", "create_model"]


def model_config(name: str, tasks, img_size=(512, 512), **overrides) -> ModelConfig:
    """The validated config ``create_model`` would build."""
    base = registered_config(name)
    return base.replace(tasks=resolve_task_channels(tasks), img_size=img_size, **overrides)


def create_model(name: str, tasks, img_size=(512, 512), pretrained=None, **overrides) -> MultiTaskModel:
    """Build a registered multi-task model.

    ``tasks`` maps task name -> output channels, or lists known task names (``TASK_CHANNELS``).
    ``img_size`` sets the positional-embedding grid (other sizes divisible by the patch size are
    interpolated at run time). ``overrides`` replace any ``ModelConfig`` field, e.g.
    ``num_experts``, ``top_k``, ``expert_ratio``, ``router``, ``moe_blocks``, ``noise_std``,
    ``head_channels``. ``pretrained`` names a local DeiT/timm ViT checkpoint to initialise the
    backbone from (see ``m3vit.models.pretrained``).
    """
    model = MultiTaskModel(model_config(name, tasks, img_size, **overrides))
    if pretrained is not None:
        load_pretrained_vit(model, pretrained)
    return model
