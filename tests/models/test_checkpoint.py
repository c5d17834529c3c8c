"""Checkpoint directories: exact round trip, atomic writes, clear errors."""

import pytest
import torch

import m3vit
from m3vit.models import ConfigError


def _model():
    torch.manual_seed(1)
    return m3vit.create_model("m3vit_micro", {"semseg": 4, "depth": 1}, img_size=(32, 32), embed_dim=32,
                              num_heads=2, depth=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8,
                              router="task_conditioned")


def test_round_trip_is_exact(tmp_path):
    model = _model()
    model.train()
    model(torch.randn(2, 3, 32, 32))  # move BN running stats away from their init
    model.eval()
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = m3vit.load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    images = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    for task in a:
        assert torch.equal(a[task], b[task])


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path):
    model = _model()
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    with torch.no_grad():
        model.heads["depth"].classifier.bias.fill_(3.0)
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded = m3vit.load_checkpoint(tmp_path / "ckpt")
    assert torch.all(loaded.heads["depth"].classifier.bias == 3.0)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _model()
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("m3vit.models.checkpoint.write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m3vit.load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        m3vit.load_checkpoint(tmp_path / "empty")
    model = _model()
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text("format: something-else\n")
    with pytest.raises(ConfigError, match="not an m3vit checkpoint config"):
        m3vit.load_checkpoint(tmp_path / "ckpt")


def test_a_run_folder_points_at_its_final_checkpoint(tmp_path):
    m3vit.save_checkpoint(_model(), tmp_path / "run" / "final")
    with pytest.raises(FileNotFoundError, match="for a training run folder use .*final"):
        m3vit.load_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError) as plain:
        m3vit.load_checkpoint(tmp_path / "run" / "final" / ".." / "..")
    assert "run folder" not in str(plain.value)


def test_an_older_checkpoint_with_per_layer_task_embeddings_still_loads(tmp_path):
    """Checkpoints written before ``task_embed`` existed hold one embedding per MoE layer and no such
    key in config.yaml: the field's default (``layer``) reads them as they are."""
    import yaml

    torch.manual_seed(1)
    model = m3vit.create_model("m3vit_micro", {"semseg": 4, "depth": 1}, img_size=(32, 32), embed_dim=32,
                               num_heads=2, depth=4, moe_blocks=[1, 3], num_experts=4, top_k=2, head_channels=8,
                               router="task_conditioned", task_embed="layer").eval()
    m3vit.save_checkpoint(model, tmp_path / "old")
    config = tmp_path / "old" / "config.yaml"
    meta = yaml.safe_load(config.read_text())
    for key in ("task_embed", "balance_loss", "init", "pos_embed_resize", "pretrained_experts"):
        del meta["model"][key]
    config.write_text(yaml.safe_dump(meta, sort_keys=False))  # task order = task ids
    loaded = m3vit.load_checkpoint(tmp_path / "old")
    assert loaded.config.task_embed == "layer"
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_a_task_embedding_layout_mismatch_is_a_clear_checkpoint_error(tmp_path):
    import yaml

    from m3vit.utils.errors import CheckpointError

    model = _model()  # registered default: one task embedding for the model
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert model.config.task_embed == "model"
    config = tmp_path / "ckpt" / "config.yaml"
    meta = yaml.safe_load(config.read_text())
    meta["model"]["task_embed"] = "layer"
    config.write_text(yaml.safe_dump(meta, sort_keys=False))  # task order = task ids
    with pytest.raises(CheckpointError, match="one task embedding for the model but the model config has "
                                              "task_embed: layer; set task_embed: model"):
        m3vit.load_checkpoint(tmp_path / "ckpt")
