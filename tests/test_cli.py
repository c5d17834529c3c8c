"""CLI: reports, JSON, and every error path as one line with a non-zero exit and no traceback."""

import json
import os
import subprocess
import sys

import pytest

from m3vit.cli import main

MICRO = ["--set", "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "model.moe_blocks=[1]", "--set", "model.head_channels=8"]


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "m3vit_small" in out and "mvit_base" in out


def test_flops_json(capsys):
    assert main(["flops", "--model", "m3vit_micro", "--tasks", "semseg", "depth", "--img-size", "32", "32",
                 "--json", *MICRO]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"] == ["semseg", "depth"] and set(report["by_task"]) == {"semseg", "depth"}
    assert report["gflops"] == pytest.approx(2 * report["gmacs"]) and report["by_component"]["experts"] > 0


def test_flops_from_checkpoint(tmp_path, capsys):
    import m3vit

    model = m3vit.create_model("mvit_micro", ["edge"], img_size=(32, 32), embed_dim=32, depth=2, num_heads=2,
                               head_channels=8)
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert main(["flops", "--checkpoint", str(tmp_path / "ckpt"), "--img-size", "32", "32"]) == 0
    assert "edge" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["flops", "--model", "nope"], "unknown model 'nope'"),
        (["flops", "--model", "m3vit_micro", "--tasks", "bogus"], "unknown task(s) ['bogus']"),
        (["flops", "--model", "m3vit_micro", "--img-size", "30", "32"], "img_size 30x32 is not divisible by the patch size 16"),
        (["flops", "--model", "m3vit_micro", "--img-size", "1600000", "16"], "img_size 1600000x16: each side must be <= 4096"),
        (["flops", "--model", "m3vit_micro", "--img-size", "4096", "4096"], "gives 65536 patch tokens; at most 16384"),
        (["flops", "--model", "m3vit_micro", "--set", "model.top_k=99"], "top_k=99 must be <= num_experts=16"),
        (["flops", "--model", "m3vit_micro", "--set", "nonsense"], "--set expects model.key=value"),
        (["flops", "--model", "m3vit_micro", "--set", "top_k=2"],
         "--set top_k: model keys are dotted, as in every command: --set model.top_k=VALUE"),
        (["flops", "--model", "m3vit_micro", "--set", "train.steps=2"], "flops takes only model keys, model.KEY=VALUE"),
        (["flops", "--model", "m3vit_micro", "--set", "model.tasks=[edge]"], "--set model.tasks: give it with --tasks"),
        (["flops", "--model", "m3vit_micro", "--set", "model.bogus=1"], "bogus"),
        (["flops", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["flops", "--model", "m3vit_micro", "--set", "model.name=mvit_micro"], "--set model.name: give it with --model"),
        (["flops", "--checkpoint", "/nonexistent/ckpt", "--set", "model.num_experts=4"],
         "--set applies to --model; a --checkpoint is counted as it was saved"),
        (["flops", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["demo", "--repeats", "0"], "argument --repeats: must be >= 1"),
        ([], "the following arguments are required: command"),
    ],
)
def test_errors_are_one_line_nonzero(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in captured.err


def test_flops_set_takes_the_dotted_model_keys_of_every_command(capsys):
    flat = ["--set", "embed_dim=32"]
    assert main(["flops", "--model", "m3vit_micro", "--img-size", "32", "32", "--json", *MICRO]) == 0
    dotted = json.loads(capsys.readouterr().out)
    assert main(["flops", "--model", "m3vit_micro", "--img-size", "32", "32", "--json", *MICRO, *flat]) == 2
    assert capsys.readouterr().err == ("error: --set embed_dim: model keys are dotted, as in every command: "
                                       "--set model.embed_dim=VALUE\n")
    default = ["--model", "m3vit_micro", "--img-size", "32", "32", "--json"]
    assert main(["flops", *default]) == 0
    assert json.loads(capsys.readouterr().out)["params_m"] > dotted["params_m"]  # the overrides took effect


def test_choice_lists_agree_with_their_registries():
    """The parser's choice lists are torch-free copies (m3vit --help loads no PyTorch): each must equal the
    registry or constant that owns it."""
    from m3vit.cli import choices
    from m3vit.data import DATASETS
    from m3vit.data.synthetic import PEOPLE_MODES
    from m3vit.efficiency.fixed_point import OVERFLOWS, ROUNDINGS
    from m3vit.efficiency.onnx_export import QUANTIZATION_METHODS
    from m3vit.engine.config import DEVICES
    from m3vit.engine.inference import PATHWAYS
    from m3vit.hardware.simulator import DESIGNS
    from m3vit.hardware.spec import list_platforms
    from m3vit.models.config import GATE_SOFTMAX
    from m3vit.tasks.base import PROTOCOLS

    assert choices.DATASETS == tuple(DATASETS)
    assert choices.PEOPLE_MODES == tuple(PEOPLE_MODES)
    assert choices.DEVICES == tuple(DEVICES)
    assert choices.EVAL_PATHWAYS == tuple(PATHWAYS)
    assert choices.EVAL_PROTOCOLS == tuple(PROTOCOLS)
    assert choices.HW_DESIGNS == tuple(DESIGNS)
    assert (choices.ROUNDINGS, choices.OVERFLOWS) == (tuple(ROUNDINGS), tuple(OVERFLOWS))
    assert choices.GATE_SOFTMAX == tuple(GATE_SOFTMAX)
    assert choices.INT8_METHODS == tuple(QUANTIZATION_METHODS)
    assert choices.packaged_platforms() == list_platforms() and "zcu104" in list_platforms()


def test_console_entry_points_without_traceback():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run([sys.executable, "-m", "m3vit", "models"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "m3vit_tiny" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "m3vit", "flops", "--model", "m3vit_micro", "--tasks", "x"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: unknown task(s)")


def test_data_show_writes_a_png_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid" / "samples.png"
    assert main(["data", "show", "--num", "2", "--size", "32", "48", "--tasks", "semseg", "depth",
                 "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height  # 2 rows x 3 columns (image, semseg, depth)
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.png"]
    assert main(["data", "show", "--num", "1", "--size", "32", "32", "--people", "close", "--tasks", "human_parts",
                 "--out", str(out)]) == 0


def test_data_show_never_replaces_a_picture_it_did_not_write(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "samples.png"
    Image.new("RGB", (8, 8), "red").save(out)
    before = out.read_bytes()
    assert main(["data", "show", "--num", "1", "--size", "32", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} exists and is not a PNG figure written by m3vit") and len(err.splitlines()) == 1
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


@pytest.mark.parametrize("name", ["samples.jpg", "samples.txt", "samples"])
def test_data_show_refuses_a_name_that_is_not_a_png(name, tmp_path, capsys):
    assert main(["data", "show", "--num", "1", "--size", "32", "32", "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "give a file name ending in .png" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "show", "--dataset", "pascal_context", "--root", "/nonexistent/PASCAL_MT"],
         "PASCAL_MT root folder not found: /nonexistent/PASCAL_MT"),
        (["data", "show", "--dataset", "nyud"], "needs its root folder"),
        (["data", "show", "--root", "/tmp"], "synthetic dataset is rendered"),
        (["data", "show", "--tasks", "bogus"], "bogus"),
        (["data", "show", "--split", "nope"], "nope"),
        (["data", "show", "--num", "0"], "argument --num: must be >= 1"),
        (["data", "show", "--num", "100000"], "--num must be <= 64 (one figure), got 100000"),
        (["data", "show", "--size", "16000", "16000"], "each side must be <= 4096"),
        (["data", "show", "--dataset", "nyud", "--root", "/tmp", "--people", "close"], "synthetic scenes only"),
        (["data", "show", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ],
)
def test_data_show_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err.splitlines()[0] and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import m3vit

    model = m3vit.create_model("mvit_micro", ["edge"], img_size=(32, 32), embed_dim=32, depth=2, num_heads=2,
                               head_channels=8)
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device:") and "no CUDA device" in err[0]


def test_a_bug_shows_its_traceback_and_user_errors_are_one_line(monkeypatch, capsys):
    """The error contract: M3ViTError and OSError are the user's (one line, exit 2); any other exception is a
    bug and must not be disguised as a user error (m3vit 0.1 printed a TypeError or KeyError as one line)."""
    import m3vit.cli as cli
    import m3vit.cli.models as command
    from m3vit.utils.errors import CheckpointError

    for bug in (TypeError("unsupported operand"), KeyError("weights"), ValueError("internal invariant")):
        def broken(args, bug=bug):
            raise bug

        monkeypatch.setattr(command, "run", broken)
        with pytest.raises(type(bug)):
            cli.main(["models"])

    def user_error(args):
        raise CheckpointError("ckpt/model.safetensors is truncated; re-save it")

    monkeypatch.setattr(command, "run", user_error)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "error: ckpt/model.safetensors is truncated; re-save it\n"

    def missing(args):
        open("/nonexistent/file.yaml")

    monkeypatch.setattr(command, "run", missing)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "error: /nonexistent/file.yaml: No such file or directory\n"


# ---------------------------------------------------------------------------------------------
# A damaged checkpoint is one line naming the file, for every command that opens one
# ---------------------------------------------------------------------------------------------
def _damage(directory, kind):
    """Damage a checkpoint directory in place; returns the file the error must name."""
    import struct

    import yaml

    weights, config = directory / "model.safetensors", directory / "config.yaml"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
        return weights
    if kind == "negative data_offsets":
        raw = weights.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        header["heads.depth.classifier.bias"]["data_offsets"] = [-4, 0]
        text = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
        return weights
    if kind == "garbage config":
        config.write_bytes(bytes(range(256)))
        return config
    meta = yaml.safe_load(config.read_text())
    meta["model"].update({"num_experts": {"num_experts": 8}, "embed_dim": {"embed_dim": 300000},
                          "task channels": {"tasks": {"semseg": 5, "depth": 1}}}[kind])
    config.write_text(yaml.safe_dump(meta))
    return config if kind == "embed_dim" else weights


COMMANDS = {
    "eval": ["eval", "--checkpoint", "{ckpt}"],
    "infer": ["infer", "--checkpoint", "{ckpt}", "--task", "depth", "--out", "{out}", "{image}"],
    "infer --stream-experts": ["infer", "--checkpoint", "{ckpt}", "--task", "depth", "--out", "{out}",
                               "--stream-experts", "{image}"],
    "experts": ["experts", "--checkpoint", "{ckpt}", "--out", "{out}"],
    "export": ["export", "--checkpoint", "{ckpt}", "--task", "depth", "--out", "{out}"],
    "hw simulate": ["hw", "simulate", "--checkpoint", "{ckpt}"],
    "flops": ["flops", "--checkpoint", "{ckpt}", "--img-size", "32", "32"],
}
DAMAGE = ["truncated weights", "negative data_offsets", "garbage config", "num_experts", "task channels", "embed_dim"]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    import m3vit

    model = m3vit.create_model("m3vit_micro", {"semseg": 4, "depth": 1}, img_size=(32, 32), embed_dim=32, depth=2,
                               num_heads=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8)
    return m3vit.save_checkpoint(model, tmp_path_factory.mktemp("moe") / "ckpt")


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_checkpoint_is_one_line_naming_the_file(moe_checkpoint, tmp_path, capsys, command, damage):
    import shutil

    from checkpoint_damage import address_space_cap  # tests/checkpoint_damage.py
    from PIL import Image

    ckpt = tmp_path / "ckpt"
    shutil.copytree(moe_checkpoint, ckpt)
    named = _damage(ckpt, damage)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    argv = [a.format(ckpt=ckpt, out=tmp_path / "out", image=image) for a in COMMANDS[command]]
    with address_space_cap():  # embed_dim: 300000 must be refused, not allocated (1.44 TB)
        code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {named}"), err
    assert not (tmp_path / "out").exists()


def test_flops_of_a_checkpoint_checks_the_size_before_running(tmp_path, capsys):
    import m3vit

    model = m3vit.create_model("mvit_micro", ["edge"], img_size=(32, 32), embed_dim=32, depth=2, num_heads=2,
                               head_channels=8)
    m3vit.save_checkpoint(model, tmp_path / "ckpt")
    assert main(["flops", "--checkpoint", str(tmp_path / "ckpt"), "--img-size", "1600000", "16"]) == 2
    err = capsys.readouterr().err
    assert err == "error: img_size 1600000x16: each side must be <= 4096 pixels (m3vit's input-size limit)\n"


def test_train_config_that_is_a_directory_or_binary_is_one_line(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    for config, message in [(tmp_path, f"error: config {str(tmp_path)!r} is a directory, not a YAML file"),
                            (binary, f"error: {binary}: not a YAML text file (it is not UTF-8 text)")]:
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.momentum=.nan", "train.momentum: must be a finite number"),
    ("model.noise_std=.nan", "noise_std must be a finite number"),
    ("train.seed=1180591620717411303424", "train.seed: must be <= 4294967295"),
])
def test_train_rejects_nan_and_huge_seeds_in_one_line(tmp_path, capsys, override, message):
    assert main(["train", "--out", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
