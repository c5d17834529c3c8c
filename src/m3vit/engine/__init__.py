"""Training and evaluation engine: run configs, the trainer, the evaluator, inference and expert usage."""

from .config import ConfigError, DataSection, EvalSection, ModelSection, RunConfig, TrainSection, load_config, parse_overrides

__all__ = ["ConfigError", "RunConfig", "ModelSection", "DataSection", "TrainSection", "EvalSection", "load_config",
           "parse_overrides"]
