"""Experiments built on the engine: the demo (M³ViT vs M-ViT end to end) and the Δm study."""

from .demo import DEFAULT_CONFIGS, DemoResult, run_demo
from .study import run_study, single_task_config

__all__ = ["DEFAULT_CONFIGS", "DemoResult", "run_demo", "run_study", "single_task_config"]
