"""Per-task extraction: exactness at min-usage 0, renormalised routing over the kept experts, the
checkpoint round trip, size reductions and the ``m3vit export`` CLI (ONNX: ``test_onnx.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.cli import main
from m3vit.data import build_dataset, preprocess
from m3vit.efficiency.export import extract_task
from m3vit.engine.config import load_config
from m3vit.analysis.experts import expert_usage
from m3vit.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
from m3vit.models.config import ConfigError
from m3vit.nn import MoE

TASKS = {"semseg": 8, "sal": 1, "normals": 3}
# init="trunc_normal": the gate offset below assumes small (std 0.02) gate weights.
TINY = dict(embed_dim=32, depth=2, num_heads=2, moe_blocks=[1], num_experts=8, top_k=2, head_channels=8,
            init="trunc_normal")
IMG = (32, 32)
# The gate offset that keeps the "starved" experts out of every top-2 of the chosen task (the other
# logits are ~N(0, 0.1)), while their softmax mass exp(-5) ≈ 0.7% is large enough to matter.
STARVED, OFFSET = (5, 6, 7), -5.0


@pytest.fixture(scope="module")
def calibration():
    return build_dataset("synthetic", "val", size=IMG, length=6, seed=0, tasks=list(TASKS))


def _model(router: str = "multi_gate", dense: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    options = dict(TINY, router=router, **overrides)
    if dense:
        options["moe_blocks"] = []
    return create_model("m3vit_micro", TASKS, img_size=IMG, **options).eval()


def _starve(model, task: str = "sal") -> None:
    """Make input dimension 0 of the MoE a constant 1 and give the ``STARVED`` experts a gate offset of
    ``OFFSET`` for ``task`` (for every task with a task-agnostic gate), so ``task`` never picks them."""
    block = model.backbone.blocks[1]
    with torch.no_grad():
        block.norm2.weight[0], block.norm2.bias[0] = 0.0, 1.0
        router = block.mlp.router
        for e in STARVED:
            if block.mlp.router_kind == "multi_gate":
                router.weight[model.tasks.index(task), e, 0] = OFFSET
            else:
                router.gate.weight[e, 0] = OFFSET


def _images(dataset, count=None):
    count = len(dataset) if count is None else count
    return preprocess([dataset[i]["image"] for i in range(count)], IMG)


def _moe_input(model, images, task):
    """The MoE layer's input tokens ``[B*N, D]`` and the routing it chose, from a forward hook."""
    seen = {}
    layer = model.backbone.blocks[1].mlp
    handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(images, tasks=[task])
    handle.remove()
    return seen["x"].reshape(-1, layer.dim), layer.last_routing


# ----------------------------------------------------------------------------------------------
# min-usage 0: exact
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router, task_embed", [("multi_gate", "model"), ("task_conditioned", "model"),
                                                ("task_conditioned", "layer"), ("shared", "model")])
def test_min_usage_zero_keeps_used_experts_and_is_exact(router, task_embed, calibration):
    """``task_embed``: the model's one task embedding (default) or one per layer (earlier layout)."""
    model = _model(router, task_embed=task_embed)
    _starve(model)
    extracted, report = extract_task(model, "sal", calibration, min_usage=0.0)
    (layer,) = report.layers
    assert set(STARVED) <= set(layer.removed), "experts the task never picked must be removed at min-usage 0"
    assert layer.kept == [e for e in range(8) if layer.usage[e] > 0] and layer.rerouted_share == 0.0
    assert extracted.tasks == ["sal"] and extracted.moe_layers[0].num_experts == len(layer.kept)
    images = _images(calibration)
    with torch.no_grad():
        expected = model(images, tasks=["sal"])["sal"]
        got = extracted(images)["sal"]
    if router == "task_conditioned":
        # The task-embedding MLP now runs on one one-hot row instead of three: same maths, but the GEMM
        # of a different shape may round differently in the last bit (~1e-7 in the gate offsets).
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:  # the same ops on the same values in the same order
        assert torch.equal(got, expected)
    assert report.max_abs_diff <= (1e-6 if router == "task_conditioned" else 0.0)
    assert report.metrics_before is not None and report.metric_change == pytest.approx(
        {k: 0.0 for k in report.metrics_before}, abs=1e-9)


def test_min_usage_zero_kept_softmax_is_not_exact_for_v_moe_weights(calibration):
    """Renormalising the softmax over the kept experts changes V-MoE combine weights (why ``all`` is the
    default): the removed experts' probability mass leaves the denominator, so every weight grows by
    1 / (kept mass)."""
    images = _images(calibration, 3)
    for renormalize in (False, True):
        model = _model(renormalize=renormalize)
        _starve(model)
        extracted, report = extract_task(model, "sal", calibration, gate_softmax="kept")
        _, before = _moe_input(model, images, "sal")
        _, after = _moe_input(extracted, images, "sal")
        kept = torch.tensor(report.layers[0].kept)
        assert torch.equal(kept[after["indices"]], before["indices"])  # same choices
        if renormalize:  # ... unless the model renormalises its top-k weights: the denominator cancels
            torch.testing.assert_close(after["weights"], before["weights"], rtol=1e-6, atol=0)
        else:
            kept_mass = before["probs"][:, kept].sum(-1, keepdim=True)
            assert (kept_mass < 1 - 1e-3).all()
            torch.testing.assert_close(after["weights"], before["weights"] / kept_mass, rtol=1e-5, atol=0)


def test_dense_model_extraction_keeps_the_backbone_and_one_head(calibration):
    model = _model(dense=True)
    extracted, report = extract_task(model, "normals", calibration)
    assert report.layers == [] and report.router is None
    images = _images(calibration, 3)
    with torch.no_grad():
        assert torch.equal(extracted(images)["normals"], model(images, tasks=["normals"])["normals"])
    heads = {t: sum(p.numel() for p in model.heads[t].parameters()) for t in TASKS}
    assert report.params_before - report.params_after == heads["semseg"] + heads["sal"]
    assert report.params_pathway == report.params_after


def test_multi_gate_extraction_is_per_task(calibration):
    """Starving experts for one task's gate removes them for that task only."""
    model = _model()
    _starve(model, "sal")
    _, sal = extract_task(model, "sal", calibration)
    _, semseg = extract_task(model, "semseg", calibration)
    assert set(STARVED) <= set(sal.layers[0].removed)
    assert not set(STARVED) & set(semseg.layers[0].removed) and semseg.layers[0].usage[STARVED[0]] > 0


# ----------------------------------------------------------------------------------------------
# A threshold: experts removed, routing over the kept ones
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_softmax", ["all", "kept"])
@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_threshold_removes_experts_and_routes_over_the_kept_ones(router, gate_softmax, calibration):
    model = _model(router, seed=1)
    usage = expert_usage(model, calibration, ["sal"]).fractions[0, 0]
    threshold = float(sorted(usage)[3])  # the four least used experts (or more, with ties) go
    extracted, report = extract_task(model, "sal", calibration, min_usage=threshold, gate_softmax=gate_softmax)
    kept = report.layers[0].kept
    assert kept == [e for e in range(8) if usage[e] > threshold] and 1 <= len(kept) <= 4
    assert report.layers[0].rerouted_share == pytest.approx(float(sum(usage[e] for e in range(8) if e not in kept)))

    # Independent reference: the original gate's logits for the same tokens (the MoE input is
    # unchanged: everything before it is), restricted to the kept experts, softmax, top-k.
    images = _images(calibration, 4)
    x, _ = _moe_input(model, images, "sal")
    _, routing = _moe_input(extracted, images, "sal")
    router_module = model.backbone.blocks[1].mlp.router
    if router == "multi_gate":
        logits = x @ router_module.weight[model.tasks.index("sal")].t()
    else:
        one_hot = torch.eye(len(TASKS))[model.tasks.index("sal")]
        embedding = router_module.embedding(one_hot)
        logits = torch.cat([x, embedding.expand(x.shape[0], -1)], dim=1) @ router_module.gate.weight.t()
    if gate_softmax == "kept":
        probs = torch.softmax(logits[:, kept], dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1)[:, kept]
    k = min(2, len(kept))
    weights, local = probs.topk(k, dim=-1)
    assert extracted.moe_layers[0].top_k == k
    assert torch.equal(routing["indices"], local)
    torch.testing.assert_close(routing["weights"], weights, rtol=0, atol=1e-6)
    if gate_softmax == "kept":  # renormalised: the kept experts' probabilities sum to one
        torch.testing.assert_close(routing["probs"].sum(-1), torch.ones(x.shape[0]))

    # The experts kept are the original ones: route every token through the reference choice by hand.
    layer = model.backbone.blocks[1].mlp
    ids = torch.tensor(kept)[local]
    hidden = torch.nn.functional.gelu(torch.einsum("sd,skdh->skh", x, layer.w1[ids]) + layer.b1[ids])
    out = torch.einsum("skh,skhd->skd", hidden, layer.w2[ids]) + layer.b2[ids]
    reference = (out * weights.unsqueeze(-1)).sum(1)
    got = extracted.moe_layers[0](x.reshape(4, -1, x.shape[-1]), 0).reshape_as(reference)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_threshold_keeping_one_expert_uses_top_1(calibration):
    model = _model(seed=2)
    usage = expert_usage(model, calibration, ["sal"]).fractions[0, 0]
    top, second = sorted(usage)[-1], sorted(usage)[-2]
    assert top > second
    extracted, report = extract_task(model, "sal", calibration, min_usage=float(second))
    assert report.layers[0].kept == [int(usage.argmax())] and report.layers[0].top_k == 1
    with torch.no_grad():
        assert torch.isfinite(extracted(_images(calibration, 2))["sal"]).all()


def test_extracted_model_round_trips_through_a_checkpoint_and_shrinks(calibration, tmp_path):
    model = _model(seed=1)
    usage = expert_usage(model, calibration, ["sal"]).fractions[0, 0]
    extracted, report = extract_task(model, "sal", calibration, min_usage=float(sorted(usage)[3]))
    save_checkpoint(model, tmp_path / "full")
    save_checkpoint(extracted, tmp_path / "sal")
    loaded = load_checkpoint(tmp_path / "sal")
    assert loaded.config == extracted.config and loaded.config.expert_subsets == {1: report.layers[0].kept}
    images = _images(calibration, 3)
    with torch.no_grad():
        assert torch.equal(loaded(images)["sal"], extracted(images)["sal"])
    # Parameters: the two other heads and the removed experts are gone, nothing else.
    layer = model.moe_layers[0]
    per_expert = layer.w1[0].numel() + layer.b1[0].numel() + layer.w2[0].numel() + layer.b2[0].numel()
    removed = len(report.layers[0].removed)
    other_heads = sum(p.numel() for t in ("semseg", "normals") for p in model.heads[t].parameters())
    other_gates = 2 * 8 * 32  # the multi-gate rows of the two other tasks
    assert report.params_after == report.params_before - other_heads - other_gates - removed * per_expert
    assert report.params_pathway == report.params_after + removed * per_expert
    assert report.params_after == sum(p.numel() for p in loaded.parameters())
    full_file = (tmp_path / "full" / "model.safetensors").stat().st_size
    sal_file = (tmp_path / "sal" / "model.safetensors").stat().st_size
    assert sal_file < full_file
    # The payloads are the files minus their headers (a JSON entry of < 256 bytes per tensor).
    assert 0 < full_file - report.weight_bytes_before < 256 * len(model.state_dict())
    assert 0 < sal_file - report.weight_bytes_after < 256 * len(loaded.state_dict())


def test_extraction_errors(calibration):
    model = _model()
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        extract_task(model, "depth", calibration)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_usage must be in"):
            extract_task(model, "sal", calibration, min_usage=bad)
    with pytest.raises(ValueError, match="removes every expert of block 1"):
        extract_task(model, "sal", calibration, min_usage=0.9)
    with pytest.raises(ValueError, match="needs a calibration dataset"):
        extract_task(model, "sal", None, min_usage=0.1)
    with pytest.raises(ValueError, match="gate_softmax"):
        extract_task(model, "sal", calibration, gate_softmax="some")
    usage = expert_usage(model, calibration, ["sal"]).fractions[0, 0]
    extracted, _ = extract_task(model, "sal", calibration, min_usage=float(sorted(usage)[3]))
    with pytest.raises(ValueError, match="already holds a subset"):
        extract_task(extracted, "sal", calibration)


def test_without_calibration_every_expert_is_kept():
    model = _model()
    extracted, report = extract_task(model, "sal")
    assert report.layers[0].kept == list(range(8)) and report.layers[0].usage is None
    assert report.num_images == 0 and report.metrics_before is None and report.max_abs_diff is None
    assert extracted.config.expert_subsets == {}


# ----------------------------------------------------------------------------------------------
# The config and the MoE layer holding a subset
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subsets, message", [
    ({0: [0, 1]}, "block 0 is not an MoE block"),
    ({1: [2, 1]}, "distinct increasing"),
    ({1: [1, 1]}, "distinct increasing"),
    ({1: [0, 8]}, r"\[0, 8\)"),
    ({1: []}, "distinct increasing"),
    ({1: "ab"}, "must be a block index"),
])
def test_config_rejects_bad_expert_subsets(subsets, message):
    cfg = ModelConfig(tasks={"sal": 1}, img_size=(32, 32), **TINY)
    with pytest.raises(ConfigError, match=message):
        cfg.replace(expert_subsets=subsets)
    with pytest.raises(ConfigError, match="gate_softmax"):
        cfg.replace(gate_softmax="none")
    round_trip = ModelConfig.from_dict(cfg.replace(expert_subsets={"1": [0, 3]}).to_dict())
    assert round_trip.expert_subsets == {1: [0, 3]}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_experts=st.integers(2, 8), top_k=st.integers(1, 3),
       extra=st.integers(0, 8), renormalize=st.booleans())
def test_moe_holding_every_used_expert_equals_the_full_layer(seed, num_experts, top_k, extra, renormalize):
    """Property: a layer holding any superset of the experts the tokens pick (softmax over all of
    them) gives bit-identical outputs and routing."""
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    full = MoE(6, 5, num_experts, top_k, num_tasks=2, renormalize=renormalize).eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        expected = full(x, 1)
    used = set(full.last_routing["indices"].unique().tolist())
    unused = [e for e in range(num_experts) if e not in used]
    ids = sorted(used | set(unused[: extra % (len(unused) + 1)]))
    part = MoE(6, 5, num_experts, min(top_k, len(ids)), num_tasks=2, renormalize=renormalize, expert_ids=ids).eval()
    with torch.no_grad():
        part.router.weight.copy_(full.router.weight)
        for name in ("w1", "b1", "w2", "b2"):
            getattr(part, name).copy_(getattr(full, name)[ids])
        got = part(x, 1)
    assert torch.equal(got, expected)
    assert torch.equal(torch.tensor(ids)[part.last_routing["indices"]], full.last_routing["indices"])
    assert torch.equal(part.last_routing["weights"], full.last_routing["weights"])


def test_moe_rejects_bad_expert_ids():
    for ids in ([], [3, 1], [0, 4]):
        with pytest.raises(ValueError, match="expert_ids"):
            MoE(6, 5, 4, 1, expert_ids=ids)
    with pytest.raises(ValueError, match="top_k"):
        MoE(6, 5, 4, 3, expert_ids=[0, 1])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _checkpoint(tmp_path, name="ckpt", **model_options):
    overrides = {"model.name": "m3vit_micro", "data.size": list(IMG), "data.val_length": 4,
                 "data.tasks": list(TASKS), "eval.batch_size": 4, "eval.edge_thresholds": 3}
    overrides.update({f"model.{k}": v for k, v in dict(TINY, **model_options).items()})
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = create_model("m3vit_micro", TASKS, img_size=IMG, **cfg.model_overrides())
    return save_checkpoint(model, tmp_path / name, extra={"run": cfg.to_dict(), "step": 7})


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_writes_a_checkpoint_and_report(tmp_path, capsys):
    source = _checkpoint(tmp_path)
    out = tmp_path / "sal"
    code, stdout, err = _run(capsys, "export", "--checkpoint", str(source), "--task", "sal", "--out", str(out),
                             "--calibration", "3")
    assert code == 0, err
    assert "parameters:" in stdout and "file size:" in stdout and "(identical)" in stdout
    report = json.loads((out / "export.json").read_text())
    assert report["task"] == "sal" and report["num_images"] == 3 and report["max_abs_diff"] == 0.0
    assert report["file_bytes_after"] == (out / "model.safetensors").stat().st_size
    assert report["file_bytes_before"] == (source / "model.safetensors").stat().st_size
    assert report["param_reduction"] > 0 and report["file_bytes_reduction"] > 0
    loaded = load_checkpoint(out)
    assert loaded.tasks == ["sal"]
    # The exported checkpoint is a normal one: it evaluates on the run's data, restricted to its task.
    code, stdout, err = _run(capsys, "eval", "--checkpoint", str(out), "--limit", "3", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)["metrics"]
    assert list(metrics) == ["sal"] and metrics["sal"] == pytest.approx(report["metrics_after"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_cli_export_dense_model(tmp_path, capsys):
    source = _checkpoint(tmp_path, moe_blocks=[])
    code, stdout, err = _run(capsys, "export", "--checkpoint", str(source), "--task", "normals",
                             "--out", str(tmp_path / "normals"), "--calibration", "2")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "normals").tasks == ["normals"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "depth"], "unknown task 'depth'"),
    (["--task", "sal", "--min-usage", "1.5"], "--min-usage must be in [0, 1)"),
    (["--task", "sal", "--min-usage", "-0.1"], "--min-usage must be in [0, 1)"),
    (["--task", "sal", "--min-usage", "0.95"], "removes every expert"),
    (["--task", "sal", "--calibration", "0"], "argument --calibration: must be >= 1"),
])
def test_cli_export_errors_are_one_line(tmp_path, capsys, argv, message):
    source = _checkpoint(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", "--checkpoint", str(source), "--out", str(out), *argv)
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_cli_export_onnx_without_the_packages_is_one_line(tmp_path, capsys, monkeypatch):
    import m3vit.efficiency.onnx_export as onnx_export

    def missing(module):
        raise onnx_export.OnnxUnavailable(f"ONNX export needs the optional package {module!r}")

    monkeypatch.setattr(onnx_export, "_require", missing)
    source = _checkpoint(tmp_path)
    code, _, err = _run(capsys, "export", "--checkpoint", str(source), "--task", "sal", "--out",
                        str(tmp_path / "out"), "--calibration", "2", "--onnx")
    assert code == 2 and err.count("\n") == 1 and "needs the optional package 'onnx'" in err
    assert not (tmp_path / "out").exists()
