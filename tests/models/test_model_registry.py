"""Registry, zoo and factory: the zoo's named configurations are registered under their names, a model
registered later is built by name like them, unknown names fail clearly, and the public names stay put."""

from __future__ import annotations

import pytest
import torch

import m3vit
from m3vit.models import ConfigError, ModelConfig, MultiTaskModel, factory, registry
from m3vit.models.zoo import named_configs


@pytest.fixture
def private_registry(monkeypatch):
    """The registry as it is, in a copy this test may change."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_the_zoo_is_registered_under_its_names():
    zoo = named_configs()
    assert {f"{p}_{s}" for p in ("m3vit", "mvit") for s in ("micro", "tiny", "small", "base")} == set(zoo)
    assert set(zoo) <= set(registry.list_models())
    described = registry.describe_models()
    for name, (cfg, description) in zoo.items():
        assert cfg.name == name and registry.registered_config(name) == cfg and described[name] == description
    assert named_configs() is not zoo  # a fresh dict each time: the registry's copy is its own


def test_a_registered_model_is_built_by_name(private_registry):
    base = registry.registered_config("mvit_micro")
    registry.register_model("my_vit", base.replace(name="my_vit", depth=2), "two blocks")
    assert "my_vit" in m3vit.list_models() and registry.describe_models()["my_vit"] == "two blocks"
    cfg = factory.model_config("my_vit", {"semseg": 4}, img_size=(32, 32), embed_dim=48)
    assert (cfg.depth, cfg.embed_dim, cfg.tasks, cfg.img_size) == (2, 48, {"semseg": 4}, (32, 32))
    model = m3vit.create_model("my_vit", {"semseg": 4}, img_size=(32, 32), embed_dim=48)
    assert isinstance(model, MultiTaskModel) and model.config == cfg and len(model.backbone.blocks) == 2
    assert model(torch.randn(1, 3, 32, 32))["semseg"].shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("my_vit", base)


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ConfigError, match=r"unknown model 'vit_huge'; available: \[.*'m3vit_micro'"):
        m3vit.create_model("vit_huge", ["semseg"])
    with pytest.raises(ConfigError, match="unknown task"):
        factory.model_config("m3vit_micro", ["semseg", "not_a_task"])


def test_public_names_keep_their_places():
    from m3vit import models

    assert m3vit.create_model is models.create_model is factory.create_model
    assert m3vit.list_models is models.list_models is registry.list_models
    assert m3vit.TASK_CHANNELS is models.TASK_CHANNELS is registry.TASK_CHANNELS
    assert models.model_config is factory.model_config and m3vit.ModelConfig is ModelConfig
    for name in ("describe_models", "register_model", "MultiTaskModel", "load_checkpoint", "save_checkpoint",
                 "load_pretrained_vit", "resample_pos_embed", "eval_mode", "moe_block_indices"):
        assert name in models.__all__ and hasattr(models, name)
