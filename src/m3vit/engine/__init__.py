"""Training and evaluation engine: run configs, the trainer and its run folders, the evaluator, inference."""

from .config import ConfigError, DataSection, EvalSection, ModelSection, RunConfig, TrainSection, load_config, parse_overrides
from .checkpoints import load_run
from .evaluator import evaluate
from .inference import infer_files, predict, read_image
from .trainer import TrainingError, TrainResult, train

__all__ = ["ConfigError", "RunConfig", "ModelSection", "DataSection", "TrainSection", "EvalSection", "load_config",
           "parse_overrides", "load_run", "evaluate", "infer_files", "predict", "read_image", "train", "TrainResult",
           "TrainingError"]
