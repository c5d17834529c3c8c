"""Checkpoint directories: exact round trip, atomic writes, clear errors, verification before allocation, and a
fuzz test over damaged weights and configs."""

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import m3vit
from checkpoint_damage import address_space_cap, corrupt_config, corrupt_weights, gist  # tests/checkpoint_damage.py
from m3vit.utils.errors import CheckpointError, M3ViTError


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
    with pytest.raises(CheckpointError, match="config.yaml is not an m3vit checkpoint config"):
        m3vit.load_checkpoint(tmp_path / "ckpt")


def test_a_file_given_as_the_checkpoint_is_told_apart_from_a_missing_folder(tmp_path):
    m3vit.save_checkpoint(_model(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    with pytest.raises(CheckpointError) as caught:
        m3vit.load_checkpoint(weights)
    assert str(caught.value) == (f"{str(weights)!r} is a file, not a checkpoint: a checkpoint is the folder holding "
                                 f"model.safetensors and config.yaml; give {str(tmp_path / 'ckpt')!r}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"notes.txt' is a file, not a checkpoint: a checkpoint is the folder "
                                              r"holding model.safetensors and config.yaml$"):
        m3vit.load_checkpoint(tmp_path / "notes.txt")


def _set_version(directory, version):
    meta = yaml.safe_load((directory / "config.yaml").read_text())
    if version is None:
        del meta["version"]
    else:
        meta["version"] = version
    (directory / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.mark.parametrize("version", [2, 99])
def test_a_checkpoint_of_a_newer_format_version_is_refused(tmp_path, version):
    from m3vit.models.checkpoint import VERSION, read_checkpoint_config, verify_checkpoint

    assert VERSION == 1 and yaml.safe_load((m3vit.save_checkpoint(_model(), tmp_path / "ckpt") / "config.yaml")
                                           .read_text())["version"] == VERSION
    _set_version(tmp_path / "ckpt", version)
    config = tmp_path / "ckpt" / "config.yaml"
    message = (rf"^{config}: checkpoint format version {version} is newer than this m3vit reads \(version 1\); "
               rf"upgrade m3vit to load it$")
    for read in (read_checkpoint_config, verify_checkpoint, m3vit.load_checkpoint):
        with pytest.raises(CheckpointError, match=message):
            read(tmp_path / "ckpt")


@pytest.mark.parametrize("version", ["1", 1.5, True, [1]])
def test_a_checkpoint_version_that_is_not_an_integer_is_named(tmp_path, version):
    m3vit.save_checkpoint(_model(), tmp_path / "ckpt")
    _set_version(tmp_path / "ckpt", version)
    with pytest.raises(CheckpointError, match=r"config.yaml: 'version' must be an integer \(the checkpoint format "
                                              r"version; this m3vit writes 1\), got "):
        m3vit.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("version", [None, 0, 1])
def test_a_checkpoint_without_a_version_or_of_an_older_one_still_loads(tmp_path, version):
    model = _model().eval()
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    _set_version(tmp_path / "ckpt", version)
    loaded = m3vit.load_checkpoint(tmp_path / "ckpt")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images).values(), loaded(images).values()))


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


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: verified before anything is allocated, one CheckpointError naming the file
# ---------------------------------------------------------------------------------------------
def _header(path):
    """``(header dict, data bytes)`` of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_header(path, header, data, length=None):
    """Write a safetensors file by hand (offsets are relative to the data, so the header may change size)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _edit_model_config(directory, **changes):
    meta = yaml.safe_load((directory / "config.yaml").read_text())
    meta["model"].update(changes)
    (directory / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.fixture
def saved(tmp_path):
    return m3vit.save_checkpoint(_model(), tmp_path / "ckpt")


def test_truncated_weights_are_named(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"^{weights}: truncated: tensor '.*' ends at byte \d+"):
        m3vit.load_checkpoint(saved)


def test_garbage_weights_are_named(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(b"\x17\x00\x00\x00\x00\x00\x00\x00this is not json at all" + bytes(64))
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a safetensors file \(the header is not valid"):
        m3vit.load_checkpoint(saved)
    weights.write_bytes(b"\xff" * 8 + bytes(100))  # a header length of 2**64 - 1
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a safetensors file \(header length \d+ is over"):
        m3vit.load_checkpoint(saved)


def test_a_config_with_other_num_experts_is_named(saved):
    _edit_model_config(saved, num_experts=8)
    with pytest.raises(CheckpointError, match=rf"^{saved / 'model.safetensors'}: the weights do not match config.yaml: "
                                              r"backbone.blocks.1.mlp.w1 is \[4, 32, 32\] in the file, \[8, 32, 32\]"):
        m3vit.load_checkpoint(saved)


def test_a_config_with_other_task_channels_is_named(saved):
    _edit_model_config(saved, tasks={"semseg": 5, "depth": 1})
    with pytest.raises(CheckpointError, match=r"weights do not match config.yaml: heads.semseg.classifier.weight is "
                                              r"\[4, 8, 1, 1\] in the file, \[5, 8, 1, 1\] in the config"):
        m3vit.load_checkpoint(saved)
    _edit_model_config(saved, tasks={"semseg": 4, "depth": 1, "sal": 1})
    with pytest.raises(CheckpointError, match=r"do not match config.yaml \(missing \['heads.sal.norm.weight'"):
        m3vit.load_checkpoint(saved)


@pytest.mark.parametrize("embed_dim, message", [
    (300000, r"config.yaml: model: embed_dim must be at most 65536, got 300000"),  # 1.44 TB of weights
    (30000, r"the weights do not match config.yaml: backbone.cls_token is \[1, 1, 32\] in the file, "
            r"\[1, 1, 30000\] in the config"),  # valid as a config: caught by comparing shapes on meta
])
def test_a_huge_embed_dim_fails_fast_without_allocating(saved, embed_dim, message):
    _edit_model_config(saved, embed_dim=embed_dim)
    started = time.perf_counter()
    with address_space_cap(), pytest.raises(CheckpointError, match=message):
        m3vit.load_checkpoint(saved)
    assert time.perf_counter() - started < 5


def test_negative_data_offsets_are_refused(saved):
    weights = saved / "model.safetensors"
    header, data = _header(weights)
    name = "heads.depth.classifier.bias"  # one float32
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-4, 0]
    _write_header(weights, header, data)
    with pytest.raises(CheckpointError, match=rf"{weights}: negative data_offsets \[-4, 0\] for tensor '{name}'"):
        m3vit.load_checkpoint(saved)


def test_a_garbage_config_is_named(saved):
    config = saved / "config.yaml"
    config.write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError, match=rf"^{config}: not valid YAML"):
        m3vit.load_checkpoint(saved)
    config.write_text("format: m3vit-checkpoint\nmodel: [1, 2]\n")
    with pytest.raises(CheckpointError, match=rf"^{config}: 'model' must be the mapping"):
        m3vit.load_checkpoint(saved)
    config.write_text("format: m3vit-checkpoint\nmodel: {tasks: {}}\n")
    with pytest.raises(CheckpointError, match=rf"^{config}: model.tasks is empty"):
        m3vit.load_checkpoint(saved)


def test_verify_gives_the_config_and_load_leaves_nothing_on_meta(saved):
    from m3vit.models.checkpoint import verify_checkpoint

    verified = verify_checkpoint(saved)
    assert verified.config == _model().config and "backbone.cls_token" in verified.layout
    model = m3vit.load_checkpoint(saved)
    # non-persistent buffers rebuilt from the config are real; nothing is left on meta
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert all(p.requires_grad for p in model.parameters())


def test_an_expert_subset_checkpoint_rebuilds_its_selectable_buffer(tmp_path):
    model = m3vit.create_model("m3vit_micro", {"semseg": 4, "depth": 1}, img_size=(32, 32), embed_dim=32,
                               num_heads=2, depth=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8,
                               expert_subsets={1: [0, 2, 3]}).eval()
    loaded = m3vit.load_checkpoint(m3vit.save_checkpoint(model, tmp_path / "subset"))
    assert torch.equal(loaded.moe_layers[0]._selectable, torch.tensor([0, 2, 3]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), loaded(x).values()))


# ---------------------------------------------------------------------------------------------
# Fuzz: every randomly damaged checkpoint gives a model or an M3ViTError, never another exception,
# and never a large allocation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    """The bytes of a valid tiny checkpoint (m3vit_micro at 32x32, 4 experts): weights and config text."""
    directory = m3vit.save_checkpoint(_model(), tmp_path_factory.mktemp("valid") / "ckpt")
    return (directory / "model.safetensors").read_bytes(), (directory / "config.yaml").read_text()


def _outcome(load, directory):
    """Load; a refusal must be an M3ViTError (anything else propagates and fails the test)."""
    with address_space_cap():
        try:
            model = load(directory)
        except M3ViTError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip(), f"not one line: {exc!r}"
            event(f"refused: {type(exc).__name__}: {gist(str(exc))}")
            return None
    event("loaded a model")
    return model


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 120)), deadline=None,  # FUZZ_EXAMPLES=5000: a longer run
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_load_checkpoint_gives_a_model_or_an_m3vit_error(valid_checkpoint, data):
    weights, config = valid_checkpoint
    damage_weights, damage_config = data.draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        new_weights = corrupt_weights(data.draw, weights) if damage_weights else weights
        (directory / "model.safetensors").write_bytes(new_weights)
        (directory / "config.yaml").write_bytes(corrupt_config(data.draw, config) if damage_config
                                                else config.encode())
        model = _outcome(m3vit.load_checkpoint, directory)
        if model is not None:
            assert isinstance(model, m3vit.MultiTaskModel) and not model.training
            with torch.no_grad():
                outputs = model(torch.zeros(1, 3, 32, 32))
            assert set(outputs) == set(model.tasks)
