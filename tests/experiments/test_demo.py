"""The main job end to end on tiny configs: outputs, reproducibility by `m3vit eval`, resume, errors."""

import json

import pytest

from m3vit.cli import main
from m3vit.engine.config import ConfigError, load_config
from m3vit.experiments.demo import compare_configs
from m3vit.experiments.report import metrics_table


def _demo(tiny_configs, out, *extra):
    return main(["demo", "--out", str(out), "--m3vit-config", str(tiny_configs["m3vit"]),
                 "--mvit-config", str(tiny_configs["mvit"]), "--repeats", "1", "--samples", "2", *extra])


def test_demo_writes_results_report_and_figures_and_eval_reproduces(tiny_configs, tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo(tiny_configs, out) == 0
    text = capsys.readouterr().out
    assert "m3vit - mvit" in text and "GFLOPs" in text
    results = json.loads((out / "results.json").read_text())
    for name in ("m3vit", "mvit"):
        run = results[name]
        assert set(run["metrics"]) == {"semseg", "sal", "edge"}
        assert set(run["latency_ms"]) == {"semseg", "sal", "edge", "all"}
        assert set(run["gflops"]) == {"semseg", "sal", "edge", "all"}
        assert (out / name / "final" / "model.safetensors").is_file()
        assert run["steps"] == 3
    # per-task difference is the difference of the two runs' metrics
    diff = results["diff"]["semseg"]["mIoU"]
    assert diff == pytest.approx(results["m3vit"]["metrics"]["semseg"]["mIoU"] - results["mvit"]["metrics"]["semseg"]["mIoU"])
    # one active pathway: a single task of the MoE model costs less than all tasks together, and the
    # same active compute as the dense model (top-4 experts of width d = one MLP of width 4d) plus its router
    assert results["m3vit"]["gflops"]["semseg"] < results["m3vit"]["gflops"]["all"]
    assert results["m3vit"]["gflops"]["semseg"] == pytest.approx(results["mvit"]["gflops"]["semseg"], rel=0.02)
    assert results["m3vit"]["gflops_executed"]["semseg"] >= results["m3vit"]["gflops"]["semseg"]
    assert "experts" in results["m3vit"] and results["figures"]["experts"]
    assert results["m3vit"]["experts"]["summary"][0]["mutual_information"] is not None
    # the gradient conflicts of both models on the same validation batch, side by side
    for name in ("m3vit", "mvit"):
        conflicts = results[name]["conflicts"]
        assert conflicts["tasks"] == ["semseg", "sal", "edge"] and conflicts["num_images"] == 4
        assert list(conflicts["pairs"]) == ["semseg|sal", "semseg|edge", "sal|edge"]
        assert all(-1 <= v <= 1 for v in conflicts["pairs"].values() if v is not None)
    report = (out / "report.md").read_text()
    assert "## Gradient conflicts between tasks" in report and "| semseg × sal |" in report
    assert "Task–expert mutual information of m3vit" in report
    assert "Data: synthetic 32x32, 8 training scenes, 3 steps of batch 4" in report  # data.train_length scenes
    for figure in ["figures/curves.png", "figures/predictions_semseg.png", "figures/predictions_edge.png",
                   "figures/conflicts.png"]:
        assert (out / figure).is_file() and figure in report
    assert not list(out.rglob("*.tmp*"))

    # `m3vit eval` of the saved checkpoint reproduces the demo's numbers
    for name in ("m3vit", "mvit"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(out / name / "final"), "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)["metrics"]
        expected = results[name]["metrics"]
        for task in ("semseg", "sal"):
            assert metrics[task] == pytest.approx(expected[task], rel=1e-9, abs=1e-9)
        # the BSDS matcher seeds its outlier graph from the clock: scores may move in the last digits
        assert metrics["edge"]["odsF"] == pytest.approx(expected["edge"]["odsF"], abs=2.0)

    # running it again resumes the finished runs instead of retraining them
    mtime = (out / "m3vit" / "final" / "model.safetensors").stat().st_mtime_ns
    assert _demo(tiny_configs, out) == 0
    assert (out / "m3vit" / "final" / "model.safetensors").stat().st_mtime_ns == mtime


def test_demo_refuses_an_unfair_comparison(tiny_configs, tmp_path, capsys):
    text = tiny_configs["mvit"].read_text().replace("lr: 0.002", "lr: 0.01")
    tiny_configs["mvit"].write_text(text)
    assert _demo(tiny_configs, tmp_path / "demo") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "fair comparison" in err[0]


def test_demo_missing_config_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--m3vit-config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0]


def test_compare_configs_names_the_differing_key(tiny_configs):
    a = load_config(tiny_configs["m3vit"])
    b = load_config(tiny_configs["mvit"], ["data.seed=3"])
    with pytest.raises(ConfigError, match="data.seed"):
        compare_configs({"a": a, "b": b})
    compare_configs({"a": a, "b": load_config(tiny_configs["mvit"])})


def test_metrics_table_marks_the_better_run_by_metric_direction():
    results = {"a": {"normals": {"mean": 20.0, "median": 15.0}, "semseg": {"mIoU": 40.0}},
               "b": {"normals": {"mean": 25.0, "median": 10.0}, "semseg": {"mIoU": 50.0}}}
    rows = {tuple(line.split()[:2]): line.split()[-1] for line in metrics_table(results).splitlines()[2:]}
    assert rows[("normals", "mean")] == "a"      # lower error is better
    assert rows[("normals", "median")] == "b"
    assert rows[("semseg", "mIoU")] == "b"       # higher IoU is better


@pytest.mark.parametrize("mine", ["figures/curves.png", "figures/predictions_sal.png",
                                  "figures/experts/experts_block1.png"])
def test_a_users_file_among_the_demo_figures_stops_it_before_any_training(tiny_configs, tmp_path, monkeypatch,
                                                                          mine):
    import m3vit.experiments.demo as demo_module
    from m3vit.experiments import run_demo
    from m3vit.utils.errors import OutputError

    def no_training(*args, **kwargs):
        raise AssertionError("a run trained before the output names were checked")

    monkeypatch.setattr(demo_module, "_train", no_training)
    out = tmp_path / "demo"
    (out / mine).parent.mkdir(parents=True)
    (out / mine).write_bytes(b"my figure")
    with pytest.raises(OutputError, match=f"{mine} exists and was not written by m3vit"):
        run_demo(out, {"m3vit": tiny_configs["m3vit"], "mvit": tiny_configs["mvit"]})
    assert (out / mine).read_bytes() == b"my figure"
