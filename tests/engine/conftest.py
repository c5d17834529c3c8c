"""Shared fixtures for engine tests: a micro run config that trains in a fraction of a second.

Tests reach it through fixtures (``tiny_cfg``, ``tiny_config``, ``tiny_overrides``), never
``import conftest``, which is ambiguous once other test folders have their own conftest.
"""

from __future__ import annotations

import pytest

from m3vit.engine.config import RunConfig, load_config

# A 32-wide, 2-block model with one 4-expert MoE layer on 32x32 synthetic scenes, 4 training steps.
TINY = {
    "model.name": "m3vit_micro",
    "model.embed_dim": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.moe_blocks": [1],
    "model.num_experts": 4,
    "model.top_k": 2,
    "model.head_channels": 8,
    "model.head_stages": 4,
    "data.name": "synthetic",
    "data.size": [32, 32],
    "data.train_length": 16,
    "data.val_length": 4,
    "data.augment": "crop",
    "train.steps": 4,
    "train.batch_size": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.progress": False,
    "eval.edge_thresholds": 3,
    "eval.batch_size": 4,
}


def make_tiny_overrides(**extra) -> list[str]:
    """The tiny config as ``--set key=value`` strings for CLI tests (``extra`` adds or replaces keys,
    written with ``__`` for the dot: ``tiny_overrides(train__steps=6)``)."""
    values = dict(TINY)
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    out = []
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")
        out += ["--set", f"{key}={text}"]
    return out


def make_tiny_config(**extra) -> RunConfig:
    """The tiny run config (``extra`` as in ``make_tiny_overrides``)."""
    values = dict(TINY)
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return load_config(None, values)


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    """A micro ``RunConfig`` (see ``TINY``); ``tmp_path`` is free for the test's output directory."""
    return make_tiny_config()


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(train__steps=6)`` -> the tiny ``RunConfig`` with keys replaced."""
    return make_tiny_config


@pytest.fixture
def tiny_overrides():
    """Factory: ``tiny_overrides(train__steps=6)`` -> the tiny config as ``--set`` CLI arguments."""
    return make_tiny_overrides


