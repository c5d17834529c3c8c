"""``m3vit eval | infer | experts``: outputs agree with the library, and every error path is one line on
stderr with exit code 2 (1 for unreadable images) and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from m3vit.cli import main
from m3vit.engine import builders
from m3vit.engine.checkpoints import load_run
from m3vit.engine.evaluator import evaluate
from m3vit.engine.config import load_config
from m3vit.models import create_model, save_checkpoint

# A micro run (one 4-expert MoE layer, 32x32 scenes, 4 validation samples); module-scoped, so not the
# function-scoped tiny_cfg fixture.
RUN = {"model.name": "m3vit_micro", "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
       "model.moe_blocks": [1], "model.num_experts": 4, "model.top_k": 2, "model.head_channels": 8,
       "data.size": [32, 32], "data.train_length": 8, "data.val_length": 4, "train.steps": 4,
       "eval.edge_thresholds": 3, "eval.batch_size": 4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A "trained" MoE checkpoint with its run config (step 7), the same weights saved without one, and a
    dense checkpoint."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, RUN)
    dataset = builders.build_eval_dataset(cfg)
    torch.manual_seed(0)
    moe = builders.build_model(cfg, dataset.task_channels)
    save_checkpoint(moe, root / "moe", extra={"run": cfg.to_dict(), "step": 7})
    save_checkpoint(moe, root / "plain")
    dense_cfg = cfg.replace({"model.name": "mvit_micro", "model.moe_blocks": []})
    dense = builders.build_model(dense_cfg, dataset.task_channels)
    save_checkpoint(dense, root / "dense", extra={"run": dense_cfg.to_dict(), "step": 3})
    (root / "empty").mkdir()
    return {"root": root, "cfg": cfg, "moe": root / "moe", "plain": root / "plain", "dense": root / "dense",
            "empty": root / "empty"}


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------
def test_eval_json_reproduces_the_library(checkpoints, capsys, tmp_path):
    out_file = tmp_path / "res" / "metrics.json"
    code, out, err = _run(["eval", "--checkpoint", checkpoints["moe"], "--json", "--out", out_file], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert json.loads(out_file.read_text()) == report
    assert report["step"] == 7 and report["checkpoint"] == str(checkpoints["moe"]) and report["delta_m"] is None
    assert report["data"]["name"] == "synthetic" and report["data"]["split"] == "val"
    assert report["data"]["num_samples"] == 4 and report["pathway"] == "single"
    model, cfg = load_run(checkpoints["moe"])
    expected = evaluate(model, builders.build_eval_dataset(cfg), eval_cfg=cfg.eval, batch_size=cfg.eval.batch_size)
    assert report["metrics"] == expected
    assert not list(out_file.parent.glob(".*"))


def test_eval_out_replaces_its_own_report_and_refuses_a_users_file(checkpoints, capsys, tmp_path):
    out_file = tmp_path / "metrics.json"
    out_file.write_text('{"metrics": {"semseg": {"mIoU": 50.0}}}\n')  # the user's baselines, say
    before = out_file.read_bytes()
    code, _, err = _run(["eval", "--checkpoint", checkpoints["moe"], "--limit", "1", "--out", out_file], capsys)
    assert code == 2 and err.startswith(f"error: {out_file} exists and is not a JSON report (m3vit-eval-report)")
    assert out_file.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    out_file.unlink()
    for _ in range(2):  # written, then replaced: its own report
        code, _, err = _run(["eval", "--checkpoint", checkpoints["moe"], "--limit", "1", "--out", out_file], capsys)
        assert code == 0, err
    assert json.loads(out_file.read_text())["format"] == "m3vit-eval-report"


def test_eval_table_shows_main_metrics_first_and_no_per_class_iou(checkpoints, capsys):
    code, out, err = _run(["eval", "--checkpoint", checkpoints["moe"], "--tasks", "depth", "semseg", "normals"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "step 7" in lines[0] and "each task through its own pathway" in lines[0]
    rows = {line.split("|")[0].strip(): line for line in lines[3:]}
    assert list(rows) == ["depth", "semseg", "normals"]
    assert rows["semseg"].split("|")[1].strip().startswith("mIoU↑")
    assert rows["depth"].split("|")[1].strip().startswith("rmse↓")
    assert rows["normals"].split("|")[1].strip().startswith("mean↓")
    assert "IoU/" not in out


def test_eval_overrides_pathway_and_limit(checkpoints, capsys):
    base = ["eval", "--checkpoint", checkpoints["moe"], "--json", "--tasks", "depth", "sal"]
    _, out, _ = _run(base + ["--limit", "2"], capsys)
    single = json.loads(out)
    assert single["data"]["num_samples"] == 2
    _, out, _ = _run(base + ["--limit", "2", "--pathway", "all", "--batch-size", "1"], capsys)
    together = json.loads(out)
    for task in ("depth", "sal"):
        for metric, value in single["metrics"][task].items():
            assert together["metrics"][task][metric] == pytest.approx(value, abs=1e-6)
    _, out, _ = _run(base + ["--set", "data.seed=3", "--set", "data.val_length=2"], capsys)
    reseeded = json.loads(out)
    assert reseeded["data"]["seed"] == 3 and reseeded["data"]["num_samples"] == 2
    model, cfg = load_run(checkpoints["moe"], ["data.seed=3", "data.val_length=2"])
    assert reseeded["metrics"] == evaluate(model, builders.build_eval_dataset(cfg), ["depth", "sal"], eval_cfg=cfg.eval)
    assert reseeded["metrics"] != single["metrics"]


def test_eval_delta_m_against_baselines(checkpoints, capsys, tmp_path):
    base = ["eval", "--checkpoint", checkpoints["moe"], "--tasks", "semseg", "depth", "--json"]
    _, out, _ = _run(base, capsys)
    metrics = json.loads(out)["metrics"]
    assert metrics["semseg"]["mIoU"] > 0
    # semseg mIoU (higher is better) at half the baseline's... the result doubles it: +100%;
    # depth rmse (lower is better) at half the baseline: +50%.
    baselines = {"semseg": {"mIoU": metrics["semseg"]["mIoU"] / 2}, "depth": {"rmse": metrics["depth"]["rmse"] * 2}}
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(baselines))
    _, out, _ = _run(base + ["--baselines", path], capsys)
    assert json.loads(out)["delta_m"] == pytest.approx((100 + 50) / 2)
    code, out, err = _run(base[:-1] + ["--baselines", path], capsys)
    assert code == 0 and "Δm" in out and "+75.00%" in out
    # baselines lacking a task: refused before evaluating
    code, _, err = _run(["eval", "--checkpoint", checkpoints["moe"], "--tasks", "sal", "--baselines", path], capsys)
    assert code == 2 and "no entry for task(s) ['sal']" in err


def test_eval_reference_protocol(checkpoints, capsys):
    """--protocol reference: the official scoring, and Δm against the paper's baselines without edge."""
    from m3vit.tasks import load_baselines, reference_baselines_path, reference_delta_m

    model, cfg = load_run(checkpoints["moe"])
    base = ["eval", "--checkpoint", checkpoints["moe"], "--tasks", "semseg", "sal", "normals", "edge"]
    _, out, _ = _run(base + ["--protocol", "reference", "--json"], capsys)
    report = json.loads(out)
    dataset = builders.build_eval_dataset(cfg)
    tasks = ["semseg", "sal", "normals", "edge"]
    assert report["protocol"] == "reference"
    assert report["metrics"] == evaluate(model, dataset, tasks, eval_cfg=cfg.eval, protocol="reference")
    assert report["delta_m"] is None  # the paper has no baselines for the synthetic scenes
    code, out, _ = _run(base + ["--protocol", "reference"], capsys)
    assert code == 0 and "official protocol" in out and "no single-task baselines for synthetic" in out
    # given baselines (here the packaged PASCAL ones), edge is left out as officially
    pascal = reference_baselines_path("pascal_context")
    _, out, _ = _run(base + ["--protocol", "reference", "--baselines", pascal, "--json"], capsys)
    report = json.loads(out)
    expected, covered = reference_delta_m(report["metrics"], load_baselines(pascal))
    assert report["delta_m"] == pytest.approx(expected) and report["delta_m_tasks"] == covered == tasks[:3]
    code, out, _ = _run(base + ["--protocol", "reference", "--baselines", pascal], capsys)
    assert "over semseg, sal, normals; edge left out as officially" in out
    # the default protocol uses every task
    _, out, _ = _run(base + ["--baselines", pascal, "--json"], capsys)
    assert json.loads(out)["delta_m_tasks"] == tasks


def test_eval_of_a_checkpoint_without_run_config(checkpoints, capsys):
    code, out, err = _run(["eval", "--checkpoint", checkpoints["plain"], "--json", "--tasks", "depth",
                           "--set", "data.val_length=2"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["step"] is None and report["data"]["size"] == [32, 32] and report["data"]["num_samples"] == 2
    with_run = json.loads(_run(["eval", "--checkpoint", checkpoints["moe"], "--json", "--tasks", "depth",
                                "--set", "data.val_length=2"], capsys)[1])
    assert report["metrics"] == with_run["metrics"]  # same weights, same scenes


def test_checkpoint_without_run_and_a_task_synthetic_lacks(tmp_path, capsys):
    model = create_model("mvit_micro", {"cityscapes_flow": 2}, img_size=(32, 32), embed_dim=32, depth=1,
                         num_heads=2, head_channels=8)
    save_checkpoint(model, tmp_path / "odd")
    code, _, err = _run(["eval", "--checkpoint", tmp_path / "odd"], capsys)
    assert code == 2 and str(tmp_path / "odd") in err and "no labels for task(s) ['cityscapes_flow']" in err


# ----------------------------------------------------------------------------------------------
# infer
# ----------------------------------------------------------------------------------------------
def test_infer_writes_pngs_and_survives_a_corrupt_file(checkpoints, capsys, tmp_path):
    good = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(good)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"not an image at all")
    out = tmp_path / "pred"
    code, stdout, err = _run(["infer", "--checkpoint", checkpoints["moe"], "--task", "semseg", "--task", "normals",
                              "--out", out, "--npy", good, corrupt], capsys)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and "x.png" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name != ".m3vit-output.json") == ["photo_normals.npy", "photo_normals.png", "photo_semseg.npy",
                                                    "photo_semseg.png"]
    assert Image.open(out / "photo_semseg.png").size == (61, 45)
    assert np.load(out / "photo_normals.npy").shape == (3, 45, 61)
    assert "for 1 image(s)" in stdout and "1 image(s) could not be read" in stdout
    code, _, err = _run(["infer", "--checkpoint", checkpoints["moe"], "--task", "sal", "--out", out, good], capsys)
    assert code == 0 and err == ""


def test_infer_compile_writes_what_eager_writes(checkpoints, capsys, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(image)
    args = ["infer", "--checkpoint", checkpoints["moe"], "--task", "sal", "--task", "semseg", "--npy"]
    code, _, err = _run(args + ["--out", tmp_path / "eager", image], capsys)
    assert code == 0, err
    code, _, err = _run(args + ["--compile", "aot_eager", "--out", tmp_path / "compiled", image], capsys)
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "compiled" / "photo_sal.npy"),
                               np.load(tmp_path / "eager" / "photo_sal.npy"), atol=1e-5)
    assert (np.load(tmp_path / "compiled" / "photo_semseg.npy") == np.load(tmp_path / "eager" / "photo_semseg.npy")).mean() > 0.99
    code, _, err = _run(args + ["--compile", "--stream-experts", "--out", tmp_path / "streamed", image], capsys)
    assert code == 2 and "runs eagerly only" in err and err.count("\n") == 1
    # an image right after a bare --compile is not taken for the backend in silence
    code, _, err = _run(args + ["--out", tmp_path / "other", "--compile", image], capsys)
    assert code == 2 and "is not a torch.compile backend: give images before --compile" in err
    assert err.count("\n") == 1 and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------
def test_experts_writes_usage_and_heatmaps(checkpoints, capsys, tmp_path):
    out = tmp_path / "experts"
    code, stdout, err = _run(["experts", "--checkpoint", checkpoints["moe"], "--out", out, "--limit", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name != ".m3vit-output.json") == ["experts_all.png", "experts_block1.png", "summary.md",
                                                    "usage.json"]
    assert "## Block 1" in (out / "summary.md").read_text()
    data = json.loads((out / "usage.json").read_text())
    assert data["step"] == 7 and data["num_images"] == 2 and data["num_experts"] == 4
    assert "block 1: core experts per task" in stdout and "mean pairwise overlap" in stdout
    mutual = data["layers"][0]["mutual_information"]
    assert 0 <= mutual <= np.log2(len(data["tasks"])) and data["summary"][0]["mutual_information"] == mutual
    assert f"task–expert mutual information: {mutual:.3f} bits" in stdout
    assert "task–expert mutual information" in (out / "summary.md").read_text()
    code, stdout, _ = _run(["experts", "--checkpoint", checkpoints["moe"], "--out", out, "--limit", "2", "--json"],
                           capsys)
    assert code == 0 and json.loads(stdout)["layers"] == data["layers"]


# ----------------------------------------------------------------------------------------------
# error paths
# ----------------------------------------------------------------------------------------------
ERRORS = [
    (["eval", "--checkpoint", "{root}/missing"], "does not exist"),
    (["eval", "--checkpoint", "{empty}"], "is not an m3vit checkpoint"),
    (["eval", "--checkpoint", "{moe}", "--tasks", "bogus"], "unknown task(s) ['bogus']; this model's tasks are"),
    (["eval", "--checkpoint", "{moe}", "--set", "data.bogus=1"], "data.bogus: unknown key"),
    (["eval", "--checkpoint", "{moe}", "--set", "nonsense"], "--set expects section.key=value"),
    (["eval", "--checkpoint", "{moe}", "--set", "data.val_length=0"], "data.val_length: must be >= 1"),
    (["eval", "--checkpoint", "{moe}", "--set", "model.embed_dim=64"], "model.embed_dim: cannot override the model"),
    (["eval", "--checkpoint", "{moe}", "--limit", "0"], "argument --limit: must be >= 1"),
    (["eval", "--checkpoint", "{moe}", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["experts", "--checkpoint", "{moe}", "--out", "{root}/e", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["eval", "--checkpoint", "{moe}", "--split", "holdout"], "unknown split 'holdout'"),
    (["eval", "--checkpoint", "{moe}", "--baselines", "{root}/none.json"], "does not exist"),
    (["eval", "--checkpoint", "{moe}", "--pathway", "some"], "invalid choice: 'some'"),
    (["eval", "--checkpoint", "{moe}", "--protocol", "paper"], "invalid choice: 'paper'"),
    (["eval"], "the following arguments are required: --checkpoint"),
    (["infer", "--checkpoint", "{root}/missing", "--task", "sal", "--out", "{root}/o", "a.png"], "does not exist"),
    (["infer", "--checkpoint", "{moe}", "--task", "bogus", "--out", "{root}/o", "a.png"],
     "unknown task(s) ['bogus']; this model's tasks are"),
    (["infer", "--checkpoint", "{moe}", "--task", "sal", "--out", "{root}/o", "--size", "30", "30", "a.png"],
     "size 30x30 is not divisible by the patch size 16"),
    (["infer", "--checkpoint", "{moe}", "--task", "sal", "--out", "{root}/o", "--size", "16000", "16000", "a.png"],
     "size 16000x16000: each side must be <= 4096"),
    (["infer", "--checkpoint", "{moe}", "--task", "sal", "--out", "{root}/o", "--size", "4096", "4096", "a.png"],
     "gives 65536 patch tokens; at most 16384"),
    (["infer", "--checkpoint", "{moe}", "--task", "sal", "--out", "{root}/o", "--max-pixels", "-1", "a.png"],
     "--max-pixels must be >= 1"),
    (["infer", "--checkpoint", "{moe}", "--task", "sal", "--out", "{root}/o"], "required: IMAGE"),
    (["experts", "--checkpoint", "{dense}", "--out", "{root}/e"], "is dense (no MoE layer)"),
    (["experts", "--checkpoint", "{empty}", "--out", "{root}/e"], "is not an m3vit checkpoint"),
    (["experts", "--checkpoint", "{moe}", "--out", "{root}/e", "--tasks", "bogus"], "unknown task(s) ['bogus']"),
    (["experts", "--checkpoint", "{moe}", "--out", "{root}/e", "--set", "eval.batch_size=x"],
     "eval.batch_size: must be an integer"),
    (["experts", "--checkpoint", "{moe}", "--out", "{root}/e", "--threshold", "0"], "--threshold must be in (0, 1]"),
]


@pytest.mark.parametrize("argv, fragment", ERRORS, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None)
def test_error_paths_are_one_line_exit_2(checkpoints, capsys, argv, fragment):
    argv = [a.format(**{k: v for k, v in checkpoints.items() if k != "cfg"}) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (checkpoints["root"] / "o").exists() and not (checkpoints["root"] / "e").exists()


def test_no_traceback_from_the_real_entry_point(checkpoints):
    argv = ["experts", "--checkpoint", str(checkpoints["dense"]), "--out", str(checkpoints["root"] / "e")]
    proc = subprocess.run([sys.executable, "-m", "m3vit", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {checkpoints['dense']}: model 'mvit_micro' is dense "
                                                f"(no MoE layer); expert usage needs an MoE checkpoint"]


# ----------------------------------------------------------------------------------------------
# load_run: what eval / experts read from a checkpoint
# ----------------------------------------------------------------------------------------------
def test_load_run_gives_the_saved_run_config(checkpoints):
    model, cfg = load_run(checkpoints["moe"])
    assert cfg.to_dict() == checkpoints["cfg"].to_dict() and not model.training
    _, changed = load_run(checkpoints["moe"], {"data.seed": 5, "eval.edge_thresholds": 7})
    assert (changed.data.seed, changed.eval.edge_thresholds) == (5, 7)


def test_load_run_without_run_config_adapts_the_defaults_to_the_model(checkpoints):
    model, cfg = load_run(checkpoints["plain"])
    assert cfg.data.name == "synthetic" and cfg.data.size == (32, 32) and cfg.data.tasks == model.tasks
    # the model section describes the saved model exactly
    assert builders.build_model(cfg, model.config.tasks).config.to_dict() == model.config.to_dict()


def test_load_run_errors_name_the_checkpoint(checkpoints, tmp_path):
    import shutil

    import yaml

    from m3vit.engine.config import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["moe"], broken)
    meta = yaml.safe_load((broken / "config.yaml").read_text())
    meta["run"]["train"]["steps"] = -1
    (broken / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match=r"broken/config.yaml \(run config\): train.steps: must be >= 1"):
        load_run(broken)
    with pytest.raises(ConfigError, match="^model.top_k: cannot override the model of a trained checkpoint"):
        load_run(checkpoints["moe"], ["model.top_k=1"])



def test_infer_refuses_a_huge_image_quickly_in_one_line(checkpoints, capsys, tmp_path, huge_png):
    """The issue's 13000x13000 PNG (small on disk) used to allocate 5.4 GB and die with a traceback."""
    good = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(good)
    out = tmp_path / "pred"
    start = time.perf_counter()
    code, stdout, err = _run(["infer", "--checkpoint", checkpoints["moe"], "--task", "sal", "--out", out,
                              huge_png, good], capsys)
    assert time.perf_counter() - start < 30
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {huge_png}: 13000x13000 is 169,000,000 pixels")
    assert sorted(p.name for p in out.iterdir() if p.name != ".m3vit-output.json") == ["photo_sal.png"]  # the other image is still written
    # a limit of our own choosing: the small image alone is refused too, and 0 lifts the limit
    code, _, err = _run(["infer", "--checkpoint", checkpoints["moe"], "--task", "sal", "--out", out,
                         "--max-pixels", "100", good], capsys)
    assert code == 1 and "above the limit of 100 (" in err
    code, _, err = _run(["infer", "--checkpoint", checkpoints["moe"], "--task", "sal", "--out", out,
                         "--max-pixels", "0", good], capsys)
    assert code == 0 and err == ""
