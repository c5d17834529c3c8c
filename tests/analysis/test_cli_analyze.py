"""``m3vit analyze conflicts | compare``: outputs agree with the library, files are written, and user
errors are one line on stderr with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m3vit.analysis import measure_conflicts
from m3vit.analysis.checkpoints import run_checkpoints
from m3vit.cli import main
from m3vit.engine import builders
from m3vit.engine.checkpoints import load_run
from m3vit.engine.config import load_config
from m3vit.models import save_checkpoint

RUN = {"model.name": "m3vit_micro", "model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2,
       "model.moe_blocks": [1], "model.num_experts": 4, "model.top_k": 2, "model.head_channels": 8,
       "data.size": [32, 32], "data.train_length": 8, "data.val_length": 4, "data.tasks": ["semseg", "sal", "depth"],
       "train.steps": 4, "eval.edge_thresholds": 3, "eval.batch_size": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An MoE checkpoint (step 7), a dense one, and a run folder with step-2, step-4 and final (step 4)."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, RUN)
    channels = builders.build_eval_dataset(cfg).task_channels
    torch.manual_seed(0)
    moe = builders.build_model(cfg, channels)
    save_checkpoint(moe, root / "moe", extra={"run": cfg.to_dict(), "step": 7})
    dense_cfg = cfg.replace({"model.name": "mvit_micro", "model.moe_blocks": []})
    save_checkpoint(builders.build_model(dense_cfg, channels), root / "dense", extra={"run": dense_cfg.to_dict(), "step": 3})
    for step in (2, 4):
        torch.manual_seed(step)
        model = builders.build_model(cfg, channels)
        save_checkpoint(model, root / "run" / "checkpoints" / f"step-{step}", extra={"run": cfg.to_dict(), "step": step})
    save_checkpoint(model, root / "run" / "final", extra={"run": cfg.to_dict(), "step": 4})
    (root / "run" / "checkpoints" / "step-9").mkdir()  # incomplete: ignored
    (root / "empty").mkdir()
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_conflicts_of_a_checkpoint_match_the_library(checkpoints, capsys, tmp_path):
    out = tmp_path / "c"
    code, stdout, err = _run(["analyze", "conflicts", "--checkpoint", checkpoints / "moe", "--batches", "2",
                              "--out", out, "--json"], capsys)
    assert code == 0, err
    data = json.loads(stdout)
    model, cfg = load_run(checkpoints / "moe")
    expected = measure_conflicts(model, builders.build_eval_dataset(cfg), batches=2, batch_size=2)
    assert data["tasks"] == ["semseg", "sal", "depth"] and data["step"] == 7 and data["num_batches"] == 2
    assert list(data["pairs"]) == ["semseg|sal", "semseg|depth", "sal|depth"]
    for key, value in expected.pairs().items():
        assert data["pairs"][key] == pytest.approx(value, abs=1e-6)
    assert np.allclose(np.array(data["cosine"], dtype=float), expected.mean_cosine, atol=1e-6, equal_nan=True)
    assert sorted(p.name for p in out.iterdir() if p.name != ".m3vit-output.json") == ["conflicts.json", "conflicts.md", "conflicts.png"]
    assert json.loads((out / "conflicts.json").read_text()) == data
    code, stdout, err = _run(["analyze", "conflicts", "--checkpoint", checkpoints / "dense", "--batches", "1",
                              "--tasks", "depth", "sal"], capsys)
    assert code == 0, err
    assert "gradient cosine between tasks" in stdout and "conflicting share" in stdout
    assert stdout.splitlines()[3].split()[:3] == ["sal", "|", "+1.000"]  # model order: sal before depth


def test_conflicts_along_a_run(checkpoints, capsys, tmp_path):
    assert [step for step, _ in run_checkpoints(checkpoints / "run")] == [2, 4]
    out = tmp_path / "r"
    code, stdout, err = _run(["analyze", "conflicts", "--run", checkpoints / "run", "--batches", "1",
                              "--out", out], capsys)
    assert code == 0, err
    rows = [line.split("|")[0].strip() for line in stdout.splitlines()]
    assert "2" in rows and "4" in rows and "step" in rows
    data = json.loads((out / "conflicts.json").read_text())
    assert list(data["steps"]) == ["2", "4"]
    assert sorted(p.name for p in out.iterdir() if p.name != ".m3vit-output.json") == ["conflicts.json", "conflicts.md", "conflicts.png", "evolution.png"]


def test_compare_two_checkpoints(checkpoints, capsys, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = _run(["analyze", "compare", checkpoints / "moe", checkpoints / "dense", "--names", "m3vit",
                              "mvit", "--batches", "1", "--limit", "2", "--out", out], capsys)
    assert code == 0, err
    assert "expert specialisation" in stdout and "gradient conflicts" in stdout
    assert "block 1" in stdout and "conflicting share" in stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["names"] == ["m3vit", "mvit"] and result["tasks"] == ["semseg", "sal", "depth"]
    moe, dense = result["checkpoints"]["m3vit"], result["checkpoints"]["mvit"]
    assert dense["specialisation"] is None and dense["router"] is None
    layer = moe["specialisation"]["layers"][0]
    assert layer["block"] == 1 and 0 <= layer["mutual_information"] <= np.log2(3)
    assert moe["specialisation"]["num_images"] == 2
    assert (out / "conflicts.png").is_file()
    code, stdout, _ = _run(["analyze", "compare", checkpoints / "moe", checkpoints / "moe", "--names", "a", "b",
                            "--batches", "1", "--json"], capsys)
    same = json.loads(stdout)["checkpoints"]
    assert same["a"]["conflicts"]["pairs"] == same["b"]["conflicts"]["pairs"]
    assert same["a"]["specialisation"] == same["b"]["specialisation"]


@pytest.mark.parametrize("argv, fragment", [
    (["analyze", "conflicts", "--checkpoint", "{root}/missing"], "does not exist"),
    (["analyze", "conflicts", "--checkpoint", "{root}/empty"], "is not an m3vit checkpoint"),
    (["analyze", "conflicts", "--run", "{root}/empty"], "no checkpoint in it"),
    (["analyze", "conflicts", "--checkpoint", "{root}/moe", "--batches", "0"], "--batches must be >= 1"),
    (["analyze", "conflicts", "--checkpoint", "{root}/moe", "--tasks", "bogus"], "unknown task(s) ['bogus']"),
    (["analyze", "conflicts", "--checkpoint", "{root}/moe", "--tasks", "sal"], "gradient conflicts need two tasks"),
    (["analyze", "conflicts", "--checkpoint", "{root}/moe", "--tasks", "sal", "sal"], "need two tasks or more"),
    (["analyze", "conflicts", "--checkpoint", "{root}/moe", "--set", "model.depth=3"], "cannot override the model"),
    (["analyze", "conflicts"], "one of the arguments --checkpoint --run is required"),
    (["analyze", "compare", "{root}/moe"], "the following arguments are required"),
    (["analyze", "compare", "{root}/moe", "{root}/dense", "--names", "x", "x"], "two distinct names"),
    (["analyze", "compare", "{root}/moe", "{root}/dense", "--limit", "0"], "--limit must be >= 1"),
    (["analyze", "bogus"], "invalid choice"),
])
def test_user_errors_are_one_line(checkpoints, capsys, argv, fragment):
    code, _, err = _run([a.format(root=checkpoints) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.mark.parametrize("command, mine", [("conflicts", "conflicts.md"), ("compare", "compare.json")])
def test_a_users_file_in_out_stops_the_analysis_before_any_work(checkpoints, capsys, tmp_path, monkeypatch,
                                                                 command, mine):
    import m3vit.analysis.checkpoints as library

    def no_work(*args, **kwargs):
        raise AssertionError("the analysis ran before the output folder was checked")

    monkeypatch.setattr(library, "checkpoint_conflicts", no_work)
    monkeypatch.setattr(library, "compare_checkpoints", no_work)
    out = tmp_path / "out"
    out.mkdir()
    (out / mine).write_text("my notes")
    args = (["--checkpoint", checkpoints / "moe"] if command == "conflicts" else
            [checkpoints / "moe", checkpoints / "dense"])
    code, _, err = _run(["analyze", command, *args, "--out", out], capsys)
    assert code == 2 and f"{mine} exists and was not written by m3vit" in err
    assert (out / mine).read_text() == "my notes" and [p.name for p in out.iterdir()] == [mine]
