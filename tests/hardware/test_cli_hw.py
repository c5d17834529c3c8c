"""`m3vit hw simulate` / `m3vit hw compare`: JSON shape, tables, tracing a checkpoint, exit codes."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import m3vit
from m3vit.cli import main

TINY = ["--model", "m3vit_micro", "--tasks", "semseg", "sal", "--img-size", "32", "32"]
SETS = dict(embed_dim=32, depth=2, num_heads=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = m3vit.create_model("m3vit_micro", {"semseg": 5, "sal": 1}, img_size=(32, 32), **SETS)
    directory = tmp_path_factory.mktemp("hw") / "ckpt"
    m3vit.save_checkpoint(model, directory)
    image = directory.parent / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype("uint8")).save(image)
    return str(directory), str(image)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_shape(capsys, tmp_path):
    out_file = tmp_path / "sim.json"
    code, out, _ = _run(capsys, "hw", "simulate", *TINY, "--experts", "8", "--top-k", "2", "--json",
                        "--out", str(out_file), "--sweep-experts", "4", "8")
    assert code == 0
    report = json.loads(out)
    assert json.loads(out_file.read_text()) == report
    assert set(report["designs"]) == {"dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip"}
    for design in report["designs"].values():
        assert {"latency_ms", "onchip_mib", "energy_j", "dram_mib", "cycles", "layers"} <= set(design)
        assert design["latency_ms"] > 0 and design["layers"][0]["name"] == "patch_embed"
    assert report["model"]["num_experts"] == 8 and report["model"]["top_k"] == 2
    assert [row["experts"] for row in report["expert_sweep"]] == [4, 8]
    assert report["task_switch"]["bytes"] > 0


def test_simulate_out_never_replaces_a_file_it_did_not_write(capsys, tmp_path):
    out_file = tmp_path / "sim.json"
    out_file.write_text("my notes\n")
    code, _, err = _run(capsys, "hw", "simulate", *TINY, "--out", str(out_file))
    assert code == 2 and err.startswith(f"error: {out_file} exists and is not a JSON report (m3vit-hw-report)")
    assert out_file.read_text() == "my notes\n"
    out_file.unlink()
    for _ in range(2):  # written, then replaced: its own report
        assert _run(capsys, "hw", "simulate", *TINY, "--out", str(out_file))[0] == 0
    assert json.loads(out_file.read_text())["format"] == "m3vit-hw-report"


def test_simulate_table_and_heads(capsys):
    code, out, _ = _run(capsys, "hw", "simulate", *TINY, "--heads", "--task", "sal", "--platform", "zcu102")
    assert code == 0
    assert "backbone + task head" in out and "zcu102" in out
    for name in ("dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip", "task switch"):
        assert name in out


def test_simulate_traced_checkpoint(capsys, checkpoint):
    directory, image = checkpoint
    code, out, _ = _run(capsys, "hw", "simulate", "--checkpoint", directory, "--image", image, "--task", "sal", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["routing"].startswith("trace of task 'sal'")
    assert report["model"]["tokens"] == 5


def test_compare_adds_measured_cpu(capsys):
    code, out, _ = _run(capsys, "hw", "compare", *TINY, "--cpu-power", "20", "--repeats", "1", "--json")
    assert code == 0
    cpu = json.loads(out)["measured"]["cpu"]
    assert cpu["latency_ms"] > 0 and cpu["energy_j"] == pytest.approx(20 * cpu["latency_ms"] / 1e3)


@pytest.mark.parametrize("argv, message", [
    (["hw", "simulate", "--platform", "nowhere.yaml"], "neither a packaged platform"),
    (["hw", "simulate", "--image", "x.png"], "--image needs --checkpoint"),
    (["hw", "simulate", *TINY, "--task", "depth"], "not one of the model's tasks"),
    (["hw", "simulate", "--model", "mvit_micro", "--designs", "moe_reorder"], "no MoE block"),
    (["hw", "simulate", *TINY, "--top-k", "17"], "top_k=17"),
    (["hw", "simulate", *TINY, "--cache-experts", "0"], "--cache-experts"),
    (["hw", "compare", *TINY], "--cpu-power"),
    (["hw", "compare", *TINY, "--cpu-power", "-1"], "must be finite and > 0"),
    (["hw", "compare", *TINY, "--cpu-power", "nan"], "must be finite and > 0"),
    (["hw"], "hw"),
    (["hw", "simulate", "--model", "m3vit_micro", "--img-size", "16000", "16000"],
     "img_size 16000x16000: each side must be <= 4096"),
    (["hw", "simulate", "--model", "m3vit_micro", "--img-size", "4096", "4096"], "65536 patch tokens"),
    (["hw", "simulate", *TINY, "--seed", "-1"], "routing seed must be an integer >= 0"),
    (["hw", "simulate", *TINY, "--routing-alpha", "nan"], "routing alpha must be a finite number > 0"),
])
def test_errors_are_one_line_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_platform_file_is_one_line(capsys, tmp_path):
    data = m3vit.hardware.load_platform("zcu104").to_dict()
    del data["clock_mhz"]
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _, err = _run(capsys, "hw", "simulate", *TINY, "--platform", str(path))
    assert code == 2 and "missing key(s) ['clock_mhz']" in err and err.count("\n") == 1


def test_traced_checkpoint_rejects_routing_overrides(capsys, checkpoint):
    directory, image = checkpoint
    code, _, err = _run(capsys, "hw", "simulate", "--checkpoint", directory, "--image", image, "--experts", "8")
    assert code == 2 and "cannot change the routing" in err


def test_checkpoint_img_size_is_checked_before_building(capsys, checkpoint):
    directory, _ = checkpoint
    code, _, err = _run(capsys, "hw", "compare", "--checkpoint", directory, "--img-size", "16000", "16000",
                        "--cpu-power", "10")
    assert code == 2 and "each side must be <= 4096" in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ("clock_mhz: 1e308", "clock_mhz must be in [1, 10000], got 1e+308"),
    ("dram_bandwidth_gbs: 5.0e-324", "dram_bandwidth_gbs must be in [0.001, 100000]"),
])
def test_extreme_platform_numbers_are_one_line(capsys, tmp_path, text, message):
    data = m3vit.hardware.load_platform("zcu104").to_dict()
    key = text.split(":")[0]
    del data[key]
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data) + text + "\n")
    code, _, err = _run(capsys, "hw", "simulate", *TINY, "--platform", str(path))
    assert code == 2 and message in err and str(path) in err and err.count("\n") == 1, err


def test_binary_platform_file_is_one_line_naming_it(capsys, tmp_path):
    path = tmp_path / "board.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    code, _, err = _run(capsys, "hw", "simulate", *TINY, "--platform", str(path))
    assert code == 2 and err == f"error: {path}: not a YAML text file (it is not UTF-8 text)\n"


def test_sixteen_bit_image_is_traced_by_its_real_values(capsys, checkpoint, tmp_path):
    """hw --image reads through the one image reader: a 16-bit PNG routes like its 8-bit twin."""
    directory, _ = checkpoint
    values = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint16)
    eight, sixteen = tmp_path / "a8.png", tmp_path / "a16.png"
    Image.fromarray(values.astype(np.uint8)).save(eight)
    Image.fromarray(values * 257).save(sixteen)  # the same picture at 16 bits: v * 65535 / 255
    routes = []
    for image in (eight, sixteen):
        code, out, _ = _run(capsys, "hw", "simulate", "--checkpoint", directory, "--image", str(image), "--json")
        assert code == 0
        routes.append({d: v["latency_ms"] for d, v in json.loads(out)["designs"].items()})
    assert routes[0] == routes[1]
