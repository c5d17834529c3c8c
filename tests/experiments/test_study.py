"""The Δm study on tiny configs: one single-task baseline per task, Δm of each multi-task model."""

import json

import pytest

from m3vit.cli import main
from m3vit.engine.config import ConfigError, load_config
from m3vit.experiments import single_task_config
from m3vit.tasks import delta_m


def test_single_task_config_keeps_the_recipe_and_the_task_weight(tiny_configs):
    cfg = load_config(tiny_configs["mvit"])
    one = single_task_config(cfg, "edge")
    assert one.data.tasks == ["edge"] and one.train.loss_weights == {"edge": 50.0}
    assert one.train.lr == cfg.train.lr and one.model.to_dict() == cfg.model.to_dict()
    with pytest.raises(ConfigError, match="depth"):
        single_task_config(cfg, "depth")


def test_study_trains_baselines_and_reports_delta_m(tiny_configs, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--single", str(tiny_configs["mvit"]),
            "--multi", "m3vit", str(tiny_configs["m3vit"]), "--set", "data.tasks=[semseg,sal]"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["tasks"] == ["semseg", "sal"]
    for task in ("semseg", "sal"):
        assert (out / "single" / task / "final" / "model.safetensors").is_file()
    baselines = json.loads((out / "baselines.json").read_text())["metrics"]
    run = study["multi"]["m3vit"]
    if run["delta_m"] is not None:
        assert run["delta_m"] == pytest.approx(delta_m(run["metrics"], baselines))
    assert "Δm" in capsys.readouterr().out


def test_study_bad_multi_pairs(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path), "--multi", "only-a-name"]) == 2
    assert "NAME CONFIG pairs" in capsys.readouterr().err
