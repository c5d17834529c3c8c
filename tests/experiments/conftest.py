"""Tiny run configs for the demo / study tests: a micro MoE model and its dense twin, 32x32 scenes."""

import pytest
import yaml

_COMMON = {
    "data": {"name": "synthetic", "size": [32, 32], "seed": 0, "tasks": ["semseg", "sal", "edge"],
             "train_length": 8, "val_length": 4, "augment": "crop"},
    "train": {"steps": 3, "batch_size": 4, "seed": 0, "optimizer": "adamw", "lr": 0.002, "schedule": "cosine",
              "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "progress": False},
    "eval": {"batch_size": 4, "edge_thresholds": 3},
}
_ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2, "head_channels": 8}


@pytest.fixture
def tiny_configs(tmp_path):
    """``{"m3vit": path, "mvit": path}`` of two tiny run configs sharing data/train/eval sections."""
    paths = {}
    models = {"m3vit": {"name": "m3vit_micro", **_ARCH, "moe_blocks": [1], "num_experts": 8, "top_k": 4},
              "mvit": {"name": "mvit_micro", **_ARCH}}
    for name, model in models.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": model, **_COMMON}))
        paths[name] = path
    return paths
