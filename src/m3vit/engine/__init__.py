"""Training and evaluation engine: run configs, the trainer, the evaluator, inference and expert usage."""

from .config import ConfigError, DataSection, EvalSection, ModelSection, RunConfig, TrainSection, load_config, parse_overrides
from .checkpoints import load_run
from .evaluator import evaluate
from .experts import ExpertUsage, expert_usage, plot_heatmaps
from .inference import infer_files, predict, read_image
from .trainer import TrainingError, TrainResult, train

__all__ = ["ConfigError", "RunConfig", "ModelSection", "DataSection", "TrainSection", "EvalSection", "load_config",
           "parse_overrides", "load_run", "evaluate", "ExpertUsage", "expert_usage", "plot_heatmaps", "infer_files",
           "predict", "read_image", "train", "TrainResult", "TrainingError"]
