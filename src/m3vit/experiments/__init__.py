"""Experiments built on the engine: the demo (M³ViT vs M-ViT end to end) and the Δm study over seeds."""

from .demo import DEFAULT_CONFIGS, DemoResult, run_demo
from .study import DEFAULT_MULTI, DEFAULT_SINGLE, run_study, single_task_config

__all__ = ["DEFAULT_CONFIGS", "DEFAULT_MULTI", "DEFAULT_SINGLE", "DemoResult", "run_demo", "run_study",
           "single_task_config"]
