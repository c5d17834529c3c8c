"""Models: the (MoE) ViT backbone and multi-task model (``m3vit.py``), the registry of names (``registry.py``),
the zoo of named configurations (``zoo.py``), the factory that builds them (``factory.py``), pretrained and
checkpoint I/O, and ``eval_mode``."""

from .config import ConfigError, ModelConfig
from .registry import TASK_CHANNELS, describe_models, list_models, register_model, registered_config
from .m3vit import MultiTaskModel, VisionTransformer, moe_block_indices, resample_pos_embed
from .factory import create_model, model_config
from .checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from .modes import eval_mode
from .pretrained import load_pretrained_vit, read_state_dict

__all__ = [
    "ConfigError", "ModelConfig", "TASK_CHANNELS", "create_model", "describe_models", "list_models",
    "model_config", "register_model", "registered_config", "MultiTaskModel", "VisionTransformer",
    "resample_pos_embed", "moe_block_indices", "load_checkpoint", "save_checkpoint", "verify_checkpoint",
    "eval_mode", "load_pretrained_vit", "read_state_dict",
]
