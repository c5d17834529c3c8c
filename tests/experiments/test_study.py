"""The Δm study over seeds on tiny configs: per-seed runs, paired Δm, statistics, held-out scenes, resume."""

import json
import shlex

import pytest

from m3vit.analysis import summarize
from m3vit.cli import build_parser, main
from m3vit.engine.config import parse_overrides
from m3vit.engine.config import ConfigError, load_config
from m3vit.experiments import DEFAULT_MULTI, DEFAULT_SINGLE, run_study, single_task_config
from m3vit.engine.config import resolve_config_path
from m3vit.tasks import delta_m


def test_single_task_config_keeps_the_recipe_and_the_task_weight(tiny_configs):
    cfg = load_config(tiny_configs["mvit"])
    one = single_task_config(cfg, "edge")
    assert one.data.tasks == ["edge"] and one.train.loss_weights == {"edge": 50.0}
    assert one.train.lr == cfg.train.lr and one.model.to_dict() == cfg.model.to_dict()
    with pytest.raises(ConfigError, match="depth"):
        single_task_config(cfg, "depth")


def test_the_default_study_is_the_issues_four_models():
    assert list(DEFAULT_MULTI) == ["m3vit", "m3vit_task_conditioned", "m3vit_shared", "mvit"]
    for relative in [*DEFAULT_MULTI.values(), DEFAULT_SINGLE]:
        assert resolve_config_path(relative).is_file()


def test_two_seed_study_end_to_end(tiny_configs, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--single", str(tiny_configs["mvit"]), "--seeds", "2",
            "--multi", "m3vit", str(tiny_configs["m3vit"]), "mvit", str(tiny_configs["mvit"]),
            "--set", "data.tasks=[semseg,sal]", "--set", "train.steps=2", "--set", "data.val_length=2",
            "--set", "eval.batch_size=2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out scenes (val split, data.seed=1)" in text and "Δm % vs mvit" in text
    study = json.loads((out / "study.json").read_text())
    assert study["tasks"] == ["semseg", "sal"] and study["seeds"] == [0, 1] and study["reference"] == "mvit"
    assert study["eval_sets"]["heldout"]["data_seed"] == 1
    for seed in (0, 1):
        for run in ("single/semseg", "single/sal", "m3vit", "mvit"):
            assert (out / f"seed-{seed}" / run / "final" / "model.safetensors").is_file()
        runs = study["runs"][str(seed)]
        assert runs["multi"]["m3vit"]["train_seed"] == seed and runs["single"]["sal"]["train_seed"] == seed
    # the two seeds train different models; the two evaluation sets are different scenes
    m3 = [study["runs"][s]["multi"]["m3vit"]["metrics"] for s in ("0", "1")]
    assert m3[0]["val"] != m3[1]["val"] and m3[0]["val"] != m3[0]["heldout"]

    for s in ("val", "heldout"):
        # paired per seed: against that seed's single-task runs and that seed's mvit
        for seed in ("0", "1"):
            runs = study["runs"][seed]
            baselines = {t: runs["single"][t]["metrics"][s][t] for t in ("semseg", "sal")}
            entry = runs["multi"]["m3vit"]["delta_m"][s]
            if entry["vs_single"] is not None:
                assert entry["vs_single"] == pytest.approx(delta_m(runs["multi"]["m3vit"]["metrics"][s], baselines))
            if entry.get("vs_reference") is not None:
                assert entry["vs_reference"] == pytest.approx(
                    delta_m(runs["multi"]["m3vit"]["metrics"][s], runs["multi"]["mvit"]["metrics"][s]))
            assert "vs_reference" not in runs["multi"]["mvit"]["delta_m"][s]
        # statistics over the seeds
        summary = study["summary"][s]
        values = [study["runs"][k]["multi"]["m3vit"]["metrics"][s]["semseg"]["mIoU"] for k in ("0", "1")]
        stats = summary["metrics"]["m3vit"]["semseg"]["mIoU"]
        expected = summarize(values)
        assert stats["mean"] == pytest.approx(expected["mean"]) and stats["std"] == pytest.approx(expected["std"])
        assert stats["ci"] == pytest.approx(expected["ci"])
        assert summary["metrics"]["single"]["sal"]["maxF"]["n"] == 2
        dm = summary["delta_m"]["m3vit"]["vs_single"]
        per_seed = [study["runs"][k]["multi"]["m3vit"]["delta_m"][s]["vs_single"] for k in ("0", "1")]
        assert dm["values"] == [v for v in per_seed if v is not None]
        if dm["ci"] is not None:
            assert dm["exceeds_spread"] == (dm["ci"][0] > 0 or dm["ci"][1] < 0)
    baselines = json.loads((out / "baselines.json").read_text())["metrics"]
    assert baselines["sal"]["maxF"] == pytest.approx(study["summary"]["val"]["metrics"]["single"]["sal"]["maxF"]["mean"])
    report = (out / "report.md").read_text()
    assert "## held-out scenes" in report and "![per-task bars](figures/study.png)" in report
    assert "m3vit study --out" in report and "--set train.steps=2" in report and (out / "figures" / "study.png").is_file()
    assert not list(out.rglob("*.tmp*"))
    # the report's command is the same study: every multi run (one --multi), the configs as given, the overrides
    command = report.split("## Reproduce")[1].split("```bash\n")[1].split("\n```")[0].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:2] == ["m3vit", "study"]
    again_args = build_parser().parse_args(words[1:])
    assert again_args.multi == ["m3vit", str(tiny_configs["m3vit"]), "mvit", str(tiny_configs["mvit"])]
    assert again_args.single == str(tiny_configs["mvit"]) and again_args.seeds == 2
    assert parse_overrides(again_args.set) == parse_overrides(argv[argv.index("--set") + 1::2])

    # resumed: nothing is retrained or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    cached = {p: p.stat().st_mtime_ns for p in out.rglob("*.study_metrics.json")}
    lines = []
    again = run_study(out, {"m3vit": tiny_configs["m3vit"], "mvit": tiny_configs["mvit"]}, tiny_configs["mvit"],
                      argv[argv.index("--set") + 1::2], seeds=2, say=lines.append)
    assert sum("not retrained" in line for line in lines) == 8
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.study_metrics.json")} == cached
    assert again["summary"] == study["summary"]


def test_one_seed_says_the_interval_is_undefined(tiny_configs, tmp_path):
    study = run_study(tmp_path / "s", {"m3vit": tiny_configs["m3vit"]}, tiny_configs["mvit"],
                      ["data.tasks=[sal]", "train.steps=1", "data.val_length=2", "eval.batch_size=2"],
                      say=lambda line: None)
    assert study["reference"] is None  # the default reference (mvit) is not in this study
    stats = study["summary"]["val"]["delta_m"]["m3vit"]["vs_single"]
    assert stats["n"] == 1 and stats["std"] is None and stats["ci"] is None and stats["exceeds_spread"] is None
    assert "undefined with one seed" in (tmp_path / "s" / "report.md").read_text()
    assert "undefined (1 seed)" in study["table"]


@pytest.mark.parametrize("extra, fragment", [
    (["--seeds", "0"], "argument --seeds: must be >= 1"),
    (["--heldout-seed", "0"], "--heldout-seed must be a scene seed"),
    (["--reference", "bogus"], "--reference 'bogus' is not one of"),
    (["--multi", "only-a-name"], "NAME CONFIG pairs"),
    (["--multi", "single", "{m3vit}"], "cannot name a folder"),
    (["--multi", "..", "{m3vit}"], "run name '..' cannot name a folder"),
    (["--multi", ".", "{m3vit}"], "run name '.' cannot name a folder"),
])
def test_study_user_errors(tiny_configs, tmp_path, capsys, extra, fragment):
    argv = ["study", "--out", str(tmp_path / "s"), "--single", str(tiny_configs["mvit"])]
    if "--multi" not in extra:
        argv += ["--multi", "m3vit", str(tiny_configs["m3vit"])]
    assert main(argv + [e.format(m3vit=tiny_configs["m3vit"]) for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "s" / "seed-0").exists()


def test_a_users_file_among_the_study_outputs_stops_it_before_any_training(tiny_configs, tmp_path, monkeypatch):
    import m3vit.experiments.study as study_module
    from m3vit.utils.errors import OutputError

    def no_training(*args, **kwargs):
        raise AssertionError("a run trained before the output names were checked")

    monkeypatch.setattr(study_module, "_train_and_eval", no_training)
    out = tmp_path / "s"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "baselines.json").write_text("{}")
    with pytest.raises(OutputError, match="seed-1/baselines.json exists and was not written by m3vit"):
        run_study(out, {"m3vit": tiny_configs["m3vit"]}, tiny_configs["mvit"], ["data.tasks=[sal]"], seeds=2,
                  say=lambda line: None)
    assert (out / "seed-1" / "baselines.json").read_text() == "{}"
