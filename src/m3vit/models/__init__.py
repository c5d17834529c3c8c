"""Models: the (MoE) ViT backbone, the multi-task model, the registry, pretrained and checkpoint I/O."""

from .config import ConfigError, ModelConfig
from .registry import TASK_CHANNELS, create_model, describe_models, list_models, model_config, register_model
from .m3vit import MultiTaskModel, VisionTransformer, resample_pos_embed  # registers the named configs
from .checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from .pretrained import load_pretrained_vit, read_state_dict

__all__ = [
    "ConfigError", "ModelConfig", "TASK_CHANNELS", "create_model", "describe_models", "list_models",
    "model_config", "register_model", "MultiTaskModel", "VisionTransformer", "resample_pos_embed",
    "load_checkpoint", "save_checkpoint", "verify_checkpoint", "load_pretrained_vit", "read_state_dict",
]
