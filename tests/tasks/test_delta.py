"""Δm (multi-task gain over single-task baselines) and loading baselines from JSON files and run folders."""

import json

import pytest

from m3vit.tasks import delta_m, load_baselines

BASELINES = {"semseg": {"mIoU": 66.2}, "normals": {"mean": 13.9}, "human_parts": {"mIoU": 59.9},
             "sal": {"mIoU": 66.3, "maxF": 80.0}, "edge": {"odsF": 68.8}, "depth": {"rmse": 0.585}}


def test_better_than_baseline_is_positive_in_both_directions():
    assert delta_m({"semseg": {"mIoU": 70.0}}, BASELINES) == pytest.approx((70.0 - 66.2) / 66.2 * 100)
    assert delta_m({"normals": {"mean": 13.0}}, BASELINES) == pytest.approx((13.9 - 13.0) / 13.9 * 100)
    assert delta_m({"depth": {"rmse": 0.7}}, BASELINES) < 0
    assert delta_m({"edge": {"odsF": 60.0}}, BASELINES) < 0
    assert delta_m({t: dict(v) for t, v in BASELINES.items()}, BASELINES) == 0.0


def test_mean_over_tasks_matches_a_hand_computed_value():
    # The M³ViT multi-gate row of the paper's PASCAL-Context table against the ResNet-18 baselines.
    results = {"semseg": {"mIoU": 72.8}, "normals": {"mean": 14.5}, "human_parts": {"mIoU": 62.1},
               "sal": {"mIoU": 66.3}, "edge": {"odsF": 71.7}}
    terms = [(72.8 - 66.2) / 66.2, -(14.5 - 13.9) / 13.9, (62.1 - 59.9) / 59.9, 0.0, (71.7 - 68.8) / 68.8]
    assert delta_m(results, BASELINES) == pytest.approx(sum(terms) / 5 * 100)
    assert delta_m(results, BASELINES) == pytest.approx(2.71, abs=0.01)  # as the paper reports


def test_metric_override():
    got = delta_m({"sal": {"maxF": 84.0, "mIoU": 0.0}}, BASELINES, metrics={"sal": "maxF"})
    assert got == pytest.approx(5.0)


@pytest.mark.parametrize(
    "results,baselines,metrics,match",
    [
        ({"semseg": {"mIoU": 70.0}}, {"normals": {"mean": 1.0}}, None, "no baseline for task 'semseg'"),
        ({"semseg": {"pixel_acc": 70.0}}, BASELINES, None, "lack metric 'mIoU'"),
        ({"semseg": {"mIoU": 70.0}}, {"semseg": {"pixel_acc": 1.0}}, None, "lacks metric 'mIoU'"),
        ({"semseg": {"mIoU": 70.0}}, {"semseg": {"mIoU": 0.0}}, None, "non-zero"),
        ({"semseg": {"mIoU": 70.0}}, BASELINES, {"semseg": "accuracy"}, "no metric 'accuracy'"),
        ({"semseg": {"mIoU": 70.0}}, BASELINES, {"depth": "rmse"}, "not in the results"),
        ({"keypoints": {"AP": 1.0}}, BASELINES, None, "unknown task 'keypoints'"),
        ({}, BASELINES, None, "at least one"),
    ],
)
def test_errors_name_the_problem(results, baselines, metrics, match):
    with pytest.raises(ValueError, match=match):
        delta_m(results, baselines, metrics)


def test_load_baselines_from_file_wrapped_file_and_run_directory(tmp_path):
    plain = tmp_path / "baselines.json"
    plain.write_text(json.dumps(BASELINES))
    assert load_baselines(plain) == BASELINES
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"metrics": BASELINES, "epoch": 3}))
    assert load_baselines(str(wrapped)) == BASELINES
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"metrics": {"depth": {"rmse": 0.5}}}))
    assert load_baselines(run) == {"depth": {"rmse": 0.5}}
    (run / "metrics.json").write_text(json.dumps({"depth": {"rmse": 0.4}}))
    assert load_baselines(run) == {"depth": {"rmse": 0.4}}  # metrics.json first
    (run / "baselines.json").write_text(json.dumps({"metrics": {"depth": {"rmse": 0.3}}, "seeds": [0, 1]}))
    assert load_baselines(run) == {"depth": {"rmse": 0.3}}  # a study folder: its single-task baselines


def test_load_baselines_says_what_to_give_for_a_file_of_several_runs(tmp_path):
    demo = tmp_path / "results.json"  # the demo's: {run: {"metrics": ...}}
    demo.write_text(json.dumps({"m3vit": {"metrics": {"sal": {"mIoU": 40.0}}}}))
    with pytest.raises(ValueError, match="m3vit/metrics is an object, not a number: give one run's metrics"):
        load_baselines(demo)


def test_load_baselines_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_baselines(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_baselines(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_baselines(bad)
    bad.write_text(json.dumps({"semseg": 66.2}))
    with pytest.raises(ValueError, match="'semseg' must be an object"):
        load_baselines(bad)
    bad.write_text(json.dumps({"semseg": {"mIoU": "high"}}))
    with pytest.raises(ValueError, match="semseg/mIoU must be a number"):
        load_baselines(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_baselines(bad)


# --- the paper's baselines and the official Δm -----------------------------------------------


def test_packaged_baselines_are_the_papers():
    from m3vit.tasks import reference_baselines_path

    pascal = load_baselines(reference_baselines_path("pascal_context"))
    assert pascal == {"semseg": {"mIoU": 66.2}, "human_parts": {"mIoU": 59.9}, "sal": {"mIoU": 66.3},
                      "normals": {"mean": 13.9}, "edge": {"odsF": 68.8}}
    nyud = load_baselines(reference_baselines_path("nyud"))
    assert nyud == {"semseg": {"mIoU": 43.9}, "depth": {"rmse": 0.585}, "normals": {"mean": 19.763}}
    assert reference_baselines_path("synthetic") is None


def test_official_delta_m_leaves_edge_out():
    """M³ViT multi-gate on PASCAL-Context (paper: seg 72.8, parts 62.1, sal 66.3, normals 14.5, edge 71.7).

    By hand: (72.8 - 66.2) / 66.2 = 0.099698, (62.1 - 59.9) / 59.9 = 0.036728, sal 0,
    -(14.5 - 13.9) / 13.9 = -0.043165: mean over the four = +2.3315 %. With edge
    ((71.7 - 68.8) / 68.8 = 0.042151) over five: +2.7082 %, the paper's +2.71.
    """
    from m3vit.tasks import reference_baselines_path, reference_delta_m

    baselines = load_baselines(reference_baselines_path("pascal_context"))
    results = {"semseg": {"mIoU": 72.8}, "human_parts": {"mIoU": 62.1}, "sal": {"mIoU": 66.3},
               "normals": {"mean": 14.5}, "edge": {"odsF": 71.7}}
    dm, tasks = reference_delta_m(results, baselines)
    assert tasks == ["semseg", "human_parts", "sal", "normals"]
    assert dm == pytest.approx((6.6 / 66.2 + 2.2 / 59.9 + 0.0 - 0.6 / 13.9) / 4 * 100, rel=1e-12)
    assert dm == pytest.approx(2.3315, abs=5e-4)
    assert delta_m(results, baselines) == pytest.approx(2.7082, abs=5e-4)  # every task, as the paper's table
    # the dense M-ViT row (paper: -1.77 with edge)
    mvit = {"semseg": {"mIoU": 70.7}, "human_parts": {"mIoU": 58.7}, "sal": {"mIoU": 64.9},
            "normals": {"mean": 15.5}, "edge": {"odsF": 68.8}}
    assert delta_m(mvit, baselines) == pytest.approx(-1.77, abs=5e-3)
    with pytest.raises(ValueError, match="leaves out"):
        reference_delta_m({"edge": {"odsF": 70.0}}, baselines)


def test_file_and_value_errors_are_data_errors(tmp_path):
    from m3vit.utils.errors import ConfigError, DataError

    bad = tmp_path / "bad.json"
    for content in (b"{not json", json.dumps({"semseg": 66.2}).encode(), bytes(range(128, 256))):
        bad.write_bytes(content)
        with pytest.raises(DataError) as err:
            load_baselines(bad)
        assert str(err.value).startswith(str(bad)) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="no baseline for task 'depth'"):
        delta_m({"depth": {"rmse": 0.5}}, {"semseg": {"mIoU": 60.0}})
    with pytest.raises(DataError, match="finite non-zero baseline"):
        delta_m({"depth": {"rmse": 0.5}}, {"depth": {"rmse": 0.0}})
    with pytest.raises(ConfigError, match="unknown task 'bogus'"):
        delta_m({"bogus": {"x": 1.0}}, {"bogus": {"x": 1.0}})
