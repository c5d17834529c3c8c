"""CLI: reports, JSON, and every error path as one line with a non-zero exit and no traceback."""

import json
import os
import subprocess
import sys

import pytest

from m3vit.cli import main

MICRO = ["--set", "embed_dim=32", "--set", "depth=2", "--set", "num_heads=2", "--set", "moe_blocks=[1]",
         "--set", "head_channels=8"]


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
        (["flops", "--model", "m3vit_micro", "--img-size", "30", "32"], "not divisible by patch_size=16"),
        (["flops", "--model", "m3vit_micro", "--set", "top_k=99"], "top_k=99 must be <= num_experts=16"),
        (["flops", "--model", "m3vit_micro", "--set", "nonsense"], "--set expects key=value"),
        (["flops", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["flops", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["demo", "--repeats", "0"], "--repeats must be >= 1"),
        ([], "the following arguments are required: command"),
    ],
)
def test_errors_are_one_line_nonzero(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in captured.err


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "show", "--dataset", "pascal_context", "--root", "/nonexistent/PASCAL_MT"],
         "PASCAL_MT root folder not found: /nonexistent/PASCAL_MT"),
        (["data", "show", "--dataset", "nyud"], "needs its root folder"),
        (["data", "show", "--root", "/tmp"], "synthetic dataset is rendered"),
        (["data", "show", "--tasks", "bogus"], "bogus"),
        (["data", "show", "--split", "nope"], "nope"),
        (["data", "show", "--num", "0"], "--num must be >= 1"),
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
