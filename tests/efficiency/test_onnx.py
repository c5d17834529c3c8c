"""ONNX deployment: the export forms of the MoE layer against the routed layer (PyTorch), the exported
graph against PyTorch with onnxruntime (every router kind, extracted subsets, dense models, dynamic
batch, batch 0 in a subprocess), that the sparse graph runs each expert only on its routed tokens,
int8 quantisation, the ONNX model adapter under the evaluator, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.cli import main
from m3vit.data import build_dataset, preprocess
from m3vit.efficiency.export import extract_task
from m3vit.efficiency.onnx_export import SparseExportMoE
from m3vit.engine.config import load_config
from m3vit.engine.evaluator import evaluate
from m3vit.analysis.experts import expert_usage
from m3vit.models import create_model, save_checkpoint
from m3vit.nn import MoE

TASKS = {"semseg": 8, "sal": 1, "normals": 3}
TINY = dict(embed_dim=32, depth=2, num_heads=2, moe_blocks=[1], num_experts=8, top_k=2, head_channels=8)
IMG = (32, 32)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def calibration():
    return build_dataset("synthetic", "val", size=IMG, length=6, seed=0, tasks=list(TASKS))


def _model(router: str = "multi_gate", seed: int = 0, tasks=TASKS, **overrides):
    torch.manual_seed(seed)
    return create_model("m3vit_micro", tasks, img_size=IMG, **dict(TINY, router=router, **overrides)).eval()


def _images(dataset, count):
    return preprocess([dataset[i]["image"] for i in range(count)], IMG)


def _onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


# ----------------------------------------------------------------------------------------------
# The export form is the routed layer (PyTorch, no ONNX packages needed)
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), router=st.sampled_from(["multi_gate", "task_conditioned", "shared"]),
       num_experts=st.integers(1, 6), top_k=st.integers(1, 3), num_tasks=st.integers(1, 3), task=st.integers(0, 2),
       renormalize=st.booleans(), subset=st.integers(0, 63), batch=st.integers(0, 3), tokens=st.integers(1, 9))
def test_export_form_equals_the_routed_layer(seed, router, num_experts, top_k, num_tasks, task, renormalize, subset,
                                            batch, tokens):
    """Property: for any router, task, expert subset (held experts, softmax over all) and batch (0 included)
    the export form gives the routed layer's output for that task."""
    task = task % num_tasks
    ids = [e for e in range(num_experts) if subset >> e & 1] or None
    top_k = min(top_k, len(ids) if ids else num_experts)
    torch.manual_seed(seed)
    layer = MoE(6, 5, num_experts, top_k, num_tasks=num_tasks, router=router, renormalize=renormalize,
                expert_ids=ids).eval()
    for p in layer.parameters():  # gates ~N(0, 1): distinct logits, routing far from ties
        torch.nn.init.normal_(p)
    x = torch.randn(batch, tokens, 6, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        expected = layer(x, task) if batch else torch.zeros_like(x)
        torch.testing.assert_close(SparseExportMoE(layer, task)(x), expected, rtol=1e-12, atol=1e-12)


def test_export_form_refuses_capacity_factor():
    layer = MoE(6, 5, 4, 2, capacity_factor=1.0).eval()
    with pytest.raises(ValueError, match="dropless"):
        SparseExportMoE(layer)
    with pytest.raises(ValueError, match="outside the layer's 1 tasks"):
        SparseExportMoE(MoE(6, 5, 4, 2), task_index=1)


# ----------------------------------------------------------------------------------------------
# The exported graph against PyTorch (onnxruntime). Exports take seconds: each file is made once per
# module and shared by the tests that read it.
# ----------------------------------------------------------------------------------------------

STARVED = 3  # the expert task "sal" never picks in the multi-gate fixture


def _sharpen(model, seed: int = 0):
    """Gates ~N(0, 1) and experts ~N(0, 0.3): routing decides the output (with the default init the
    experts are so small that any routing gives nearly the same prediction, and a test of it could not fail)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.moe_layers:
            for name, param in layer.named_parameters():
                std = 1.0 if name.startswith("router.") else 0.3
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="module")
def multi_gate(calibration, tmp_path_factory):
    """A 3-task multi-gate model whose task "sal" (not the first) never routes to expert ``STARVED``, and its
    sparse export for "sal"."""
    _onnx()
    from m3vit.efficiency.onnx_export import export_onnx

    model = _sharpen(_model(seed=4))
    with torch.no_grad():  # MoE input dimension 0 is a constant 1; the starved expert's sal gate weight there is -100
        block = model.backbone.blocks[1]
        block.norm2.weight[0], block.norm2.bias[0] = 0.0, 1.0
        block.mlp.router.weight[model.tasks.index("sal"), STARVED, 0] = -100.0
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "sal.onnx", task="sal")
    return model, path


def _parity(model, path, images, task):
    """Max abs difference per batch size 1, 2, 3 (the dynamic batch axis)."""
    from m3vit.efficiency.onnx_export import check_onnx

    return [check_onnx(model, path, images[:b], task=task) for b in (1, 2, 3)]


def _routed_as(model, images, head_task, routing_task):
    """``head_task``'s head on the backbone routed as ``routing_task``."""
    with torch.no_grad():
        features, grid = model.backbone(images, [model.tasks.index(routing_task)])
        return model.heads[head_task](features[0], grid, images.shape[-2:])


def test_export_of_one_task_of_a_multi_task_model_matches_pytorch(multi_gate, calibration):
    from m3vit.efficiency.onnx_export import read_metadata

    model, path = multi_gate
    images = _images(calibration, 3)
    assert max(_parity(model, path, images, "sal")) <= TOLERANCE
    # The check can fail: routed as another task, the same head predicts something else.
    with torch.no_grad():
        expected = model(images, tasks=["sal"])["sal"]
    assert (expected - _routed_as(model, images, "sal", "semseg")).abs().max() > 10 * TOLERANCE
    metadata = read_metadata(path)
    assert metadata["m3vit.task"] == "sal" and metadata["m3vit.moe_form"] == "sparse"
    assert json.loads(metadata["m3vit.config"])["tasks"] == TASKS


@pytest.mark.parametrize("router, gate_softmax", [("multi_gate", "kept"), ("task_conditioned", "kept"),
                                                  ("shared", "all")])
def test_sparse_export_of_an_extracted_task_matches_pytorch(router, gate_softmax, calibration, tmp_path):
    """Extracted subsets: experts removed, top-k over the kept ones, softmax over all or only the kept."""
    _onnx()
    from m3vit.efficiency.onnx_export import export_onnx, read_metadata

    model = _sharpen(_model(router, seed=1))
    usage = expert_usage(model, calibration, ["normals"]).fractions[0, 0]
    extracted, report = extract_task(model, "normals", calibration, min_usage=float(sorted(usage)[2]),
                                     gate_softmax=gate_softmax)
    assert report.layers[0].removed
    path = export_onnx(extracted, tmp_path / "normals.onnx")
    assert max(_parity(extracted, path, _images(calibration, 3), "normals")) <= TOLERANCE
    assert json.loads(read_metadata(path)["m3vit.config"])["expert_subsets"] == {"1": report.layers[0].kept}


def test_export_of_a_dense_model_matches_pytorch_and_runs_batch_zero(calibration, tmp_path):
    _onnx()
    from m3vit.efficiency.onnx_export import export_onnx, read_metadata

    model = _model(moe_blocks=[], seed=3)
    path = export_onnx(model, tmp_path / "semseg.onnx", task="semseg")
    assert max(_parity(model, path, _images(calibration, 3), "semseg")) <= TOLERANCE
    assert read_metadata(path)["m3vit.moe_form"] == "none"
    _assert_batch_zero_runs(path, channels=8)


def test_export_errors(tmp_path):
    _onnx()
    from m3vit.efficiency.onnx_export import export_onnx

    with pytest.raises(ValueError, match="name the one to export"):
        export_onnx(_model(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        export_onnx(_model(), tmp_path / "x.onnx", task="depth")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Batch 0: onnxruntime died of SIGFPE on the first export (its dense-equivalent MoE's Einsum over an
# empty token axis). Run it in a subprocess, so a crash fails the test instead of killing pytest.
# The dense model covers the graph without MoE (test_export_of_a_dense_model_...).
# ----------------------------------------------------------------------------------------------

_RUN_BATCHES = """
import sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for batch in (0, 2):
    (out,) = session.run(None, {"images": np.zeros((batch, 3, 32, 32), np.float32)})
    print(batch, *out.shape, flush=True)
"""


def _assert_batch_zero_runs(path, channels):
    run = subprocess.run([sys.executable, "-c", _RUN_BATCHES, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"onnxruntime exited with {run.returncode} on batch 0: {run.stderr[-500:]}"
    assert run.stdout.splitlines() == [f"0 0 {channels} 32 32", f"2 2 {channels} 32 32"]


def test_a_session_without_spinning_threads_gives_the_same_output(multi_gate, calibration):
    from m3vit.efficiency.onnx_export import onnx_session

    _, path = multi_gate
    images = {"images": _images(calibration, 2).numpy()}
    spinning = onnx_session(path, threads=2)
    quiet = onnx_session(path, threads=2, spin=False)
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (quiet.run(None, images)[0] == spinning.run(None, images)[0]).all()


def test_sparse_export_runs_batch_zero(multi_gate):
    _assert_batch_zero_runs(multi_gate[1], channels=1)


# ----------------------------------------------------------------------------------------------
# The sparse graph is sparse
# ----------------------------------------------------------------------------------------------


def _expert_gemm_rows(path, images) -> tuple[Counter, int]:
    """Rows each expert's first GEMM (``tokens @ w1[e]``) executed in one onnxruntime run (from its
    profile), and the number of such GEMMs in the graph."""
    import onnx
    import onnxruntime as ort

    expert_of = {}
    for node in onnx.load(str(path)).graph.node:
        for name in node.input:
            if node.op_type == "MatMul" and ".mlp.w1." in name:
                expert_of[node.name] = int(name.rsplit(".", 1)[1])
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the node names
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": images.numpy()})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    rows = Counter()
    for event in events:
        name = event.get("name", "")
        node = name.removesuffix("_kernel_time")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and node in expert_of:
            rows[expert_of[node]] += event["args"]["input_type_shape"][0]["float"][0]
    return rows, len(expert_of)


def test_sparse_graph_runs_each_expert_on_its_routed_tokens_only(multi_gate, calibration):
    import onnx

    model, path = multi_gate
    images = _images(calibration, 3)
    with torch.no_grad():
        model(images, tasks=["sal"])
    counts = model.moe_layers[0].last_routing["counts"]
    assert counts[STARVED] == 0 and sum(counts) == 3 * 5 * 2  # 3 images x (1 + 2x2 tokens) x top-2
    rows, gemms = _expert_gemm_rows(path, images)
    assert gemms == 8 and rows == Counter({e: c for e, c in enumerate(counts) if c})
    # One NonZero and one ScatterND (index_add) per expert, TopK for the routing, and no [tokens, experts]
    # combine matrix (a dense-equivalent form scatters the top-k weights into one: ScatterElements).
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["NonZero"] == 8 and ops["ScatterND"] == 8 and ops["TopK"] == 1 and ops["ScatterElements"] == 0


# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_runs_is_smaller_and_close_with_float_routing(method, multi_gate, calibration, tmp_path):
    import onnx

    from m3vit.efficiency.onnx_export import onnx_session, quantize_onnx, read_metadata

    _, path = multi_gate
    images = _images(calibration, 6)
    int8 = quantize_onnx(path, tmp_path / "sal.int8.onnx", method=method, calibration=images)
    # Measured 0.63 (static), 0.79 (dynamic: convolutions stay float); a tiny model's file is mostly graph, so
    # a real model's shrinks more (m3vit_small, static: 0.27).
    assert int8.stat().st_size < 0.85 * path.stat().st_size
    assert read_metadata(int8) == read_metadata(path)
    fp32 = onnx_session(path).run(None, {"images": images.numpy()})[0]
    got = onnx_session(int8).run(None, {"images": images.numpy()})[0]
    diff, scale = float(abs(got - fp32).max()), float(abs(fp32).max())
    assert 0 < diff <= 0.15 * scale  # measured 4.0% (static) and 1.3% (dynamic) of the largest output

    proto = onnx.load(str(int8))
    ops = Counter(node.op_type for node in proto.graph.node)
    int8_weights = {name for node in proto.graph.node for name in node.input if "quantized" in name}
    assert len({w for w in int8_weights if ".mlp.w1." in w}) == 8, "every expert's first GEMM weight is int8"
    conv_weights = {w for w in int8_weights if ".stages." in w or ".patch_embed." in w}
    if method == "dynamic":  # linear layers only, through DynamicQuantizeLinear + MatMulInteger
        assert ops["MatMulInteger"] > 0 and not conv_weights and ops["QuantizeLinear"] == 0
    else:  # QDQ convolutions and linear layers
        assert conv_weights and ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and ops["MatMulInteger"] == 0
    # Float stays: the routing (the gate reads the float tokens and weight, softmax feeds TopK) and the
    # attention's two activation x activation products per block.
    produced_by = {out: node for node in proto.graph.node for out in node.output}
    floats = {init.name for init in proto.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    (topk,) = [node for node in proto.graph.node if node.op_type == "TopK"]
    softmax = produced_by[topk.input[0]]
    gate = produced_by[produced_by[softmax.input[0]].input[0]]
    assert softmax.op_type == "Softmax" and gate.op_type == "MatMul"
    assert gate.input[1] in floats and produced_by[gate.input[0]].op_type == "LayerNormalization"
    weights = {init.name for init in proto.graph.initializer}
    dequantized_weights = {node.output[0] for node in proto.graph.node
                           if node.op_type == "DequantizeLinear" and node.input[0] in weights}
    products = [node for node in proto.graph.node if node.op_type == "MatMul"
                and not {node.input[0], node.input[1]} & (weights | dequantized_weights)]
    assert len(products) == 2 * 2  # q k^T and (softmax) v in each of the two blocks
    assert all(produced_by[i].op_type != "DequantizeLinear" for node in products for i in node.input)


def test_int8_can_keep_the_experts_in_float(multi_gate, calibration, tmp_path):
    import onnx

    from m3vit.efficiency.onnx_export import quantize_onnx

    _, path = multi_gate
    images = _images(calibration, 2)

    def int8_weights(**options):
        proto = onnx.load(str(quantize_onnx(path, tmp_path / "sal.int8.onnx", calibration=images, **options)))
        return {name for node in proto.graph.node for name in node.input if name.endswith("_quantized")}

    everything, float_experts = int8_weights(), int8_weights(float_experts=True)
    experts = {w for w in everything if ".mlp.w1." in w or ".mlp.w2." in w}
    assert len(experts) == 16 and everything - float_experts == experts  # only the experts' GEMMs stay float


def test_quantize_errors(multi_gate, tmp_path):
    from m3vit.efficiency.onnx_export import quantize_onnx

    with pytest.raises(ValueError, match="not a quantisation method"):
        quantize_onnx(multi_gate[1], tmp_path / "x.onnx", method="int4")
    with pytest.raises(ValueError, match="needs calibration images"):
        quantize_onnx(multi_gate[1], tmp_path / "x.onnx", method="static")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The evaluator runs an ONNX file through the adapter
# ----------------------------------------------------------------------------------------------


def test_evaluator_scores_the_onnx_adapter_like_the_model(multi_gate, calibration, tmp_path):
    from m3vit.efficiency.onnx_export import quantize_onnx
    from m3vit.efficiency.onnx_model import OnnxModel, evaluate_onnx

    model, path = multi_gate
    adapter = OnnxModel(path, threads=1)
    assert adapter.tasks == ["sal"] and adapter.config.tasks == {"sal": 1} and adapter.config.img_size == IMG
    assert next(adapter.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="this ONNX model's task is 'sal'"):
        adapter(_images(calibration, 1), tasks=["semseg"])
    expected = evaluate(model, calibration, ["sal"], batch_size=4)
    got = evaluate(adapter, calibration, batch_size=4)
    assert list(got) == ["sal"] and list(got["sal"]) == list(expected["sal"])
    assert got["sal"] == pytest.approx(expected["sal"], abs=1e-3)
    int8 = quantize_onnx(path, tmp_path / "sal.int8.onnx", method="dynamic")
    scored = evaluate_onnx(int8, calibration, batch_size=4)
    assert list(scored["sal"]) == list(expected["sal"])


def test_onnx_adapter_refuses_foreign_files(multi_gate, tmp_path):
    import onnx

    from m3vit.efficiency.onnx_model import OnnxModel
    from m3vit.utils.errors import InputError

    proto = onnx.load(str(multi_gate[1]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(InputError, match="has no m3vit metadata"):
        OnnxModel(tmp_path / "foreign.onnx")
    with pytest.raises(InputError, match="does not exist"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="is a folder, not an ONNX file"):
        OnnxModel(tmp_path)
    for key, value in (("m3vit.config", "{not json"), ("m3vit.task", "depth")):
        damaged = onnx.load(str(multi_gate[1]))
        next(p for p in damaged.metadata_props if p.key == key).value = value
        onnx.save(damaged, str(tmp_path / "damaged.onnx"))
        with pytest.raises(InputError, match=f"damaged.onnx: its m3vit metadata is damaged \\({key}"):
            OnnxModel(tmp_path / "damaged.onnx")


def test_onnx_adapter_unknown_task_is_an_input_error(multi_gate, calibration):
    from m3vit.efficiency.onnx_model import OnnxModel
    from m3vit.utils.errors import InputError

    adapter = OnnxModel(multi_gate[1], threads=1)
    for tasks in (["depth"], "semseg", []):
        with pytest.raises(InputError, match="this ONNX model's task is 'sal'"):
            adapter.resolve_tasks(tasks)
    with pytest.raises(InputError, match=r"unknown task\(s\) \['semseg'\]"):
        adapter(_images(calibration, 1), tasks=["semseg"])
    assert adapter.resolve_tasks(None) == adapter.resolve_tasks("sal") == ["sal"]


def _unusable_onnx_files(folder, model_path):
    """Files onnxruntime cannot load as a model, by the failure they caused: a parse error (InvalidProtobuf),
    a protobuf without a graph (InvalidArgument), a graph that does not connect (InvalidArgument), an unknown
    operator (InvalidGraph)."""
    import onnx
    from onnx import TensorProto, helper

    data = model_path.read_bytes()
    files = {"empty": b"", "truncated": data[:len(data) // 2], "yaml": b"format: m3vit-checkpoint\n",
             "binary": bytes(range(256)) * 8, "no_graph": b"\x08\x07"}
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    for name, node in (("dangling", helper.make_node("Relu", ["z"], ["y"])),
                       ("unknown_op", helper.make_node("NoSuchOp", ["x"], ["y"]))):
        files[name] = helper.make_model(helper.make_graph([node], "g", [x], [y]), ir_version=8,
                                        opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    for name, content in files.items():
        (folder / f"{name}.onnx").write_bytes(content)
    assert onnx.load_from_string(files["dangling"]).graph.node  # a parseable model, refused by onnxruntime only
    return [folder / f"{name}.onnx" for name in files]


def test_onnx_session_refuses_unusable_files_in_one_line(multi_gate, tmp_path):
    from m3vit.efficiency.onnx_export import onnx_session
    from m3vit.efficiency.onnx_model import OnnxModel
    from m3vit.utils.errors import InputError

    for path in _unusable_onnx_files(tmp_path, multi_gate[1]):
        for load in (lambda p: onnx_session(p, threads=1), OnnxModel):
            with pytest.raises(InputError) as caught:
                load(path)
            message = str(caught.value)
            assert message.startswith(f"{path} is not ") and "\n" not in message, message


# ----------------------------------------------------------------------------------------------
# CLI: m3vit export --onnx --int8, m3vit eval --onnx
# ----------------------------------------------------------------------------------------------


def _checkpoint(tmp_path):
    overrides = {"model.name": "m3vit_micro", "data.size": list(IMG), "data.val_length": 4,
                 "data.tasks": list(TASKS), "eval.batch_size": 4, "eval.edge_thresholds": 3}
    overrides.update({f"model.{k}": v for k, v in TINY.items()})
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = create_model("m3vit_micro", TASKS, img_size=IMG, **cfg.model_overrides())
    return save_checkpoint(model, tmp_path / "ckpt", extra={"run": cfg.to_dict(), "step": 7})


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export_onnx_int8_and_eval_onnx(tmp_path, capsys):
    _onnx()
    source, out = _checkpoint(tmp_path), tmp_path / "sal"
    code, stdout, err = _run(capsys, "export", "--checkpoint", source, "--task", "sal", "--out", out,
                             "--calibration", 4, "--onnx", "--int8", "static")
    assert code == 0, err
    assert "int8 (static): model.int8.onnx" in stdout and "model.int8.onnx)" in stdout
    report = json.loads((out / "export.json").read_text())["onnx"]
    assert report["checked"] and report["max_abs_diff"] <= TOLERANCE
    int8 = report["int8"]
    assert int8["method"] == "static" and int8["num_images"] == 4 and int8["max_abs_diff_vs_fp32"] > 0
    assert int8["bytes"] == (out / "model.int8.onnx").stat().st_size < report["bytes"] == (out / "model.onnx").stat().st_size

    code, stdout, err = _run(capsys, "eval", "--checkpoint", out, "--json")
    assert code == 0, err
    pytorch = json.loads(stdout)
    for name in ("model.onnx", "model.int8.onnx"):
        code, stdout, err = _run(capsys, "eval", "--checkpoint", out, "--onnx", out / name, "--json")
        assert code == 0, err
        scored = json.loads(stdout)
        assert scored["onnx"] == str(out / name) and list(scored["metrics"]["sal"]) == list(pytorch["metrics"]["sal"])


@pytest.mark.parametrize("argv, message", [
    (["export", "--task", "sal", "--out", "OUT", "--int8"], "--int8 quantises the ONNX file: add --onnx"),
    (["eval", "--onnx", "CKPT/config.yaml"], "is not an ONNX file"),
    (["eval", "--onnx", "CKPT/missing.onnx"], "does not exist"),
    (["eval", "--onnx", "CKPT"], "is a folder, not an ONNX file"),
    (["eval", "--onnx", "EMPTY"], "is not a usable ONNX model"),
    (["eval", "--onnx", "CKPT/config.yaml", "--fixed-point"], "cannot be combined with --onnx"),
])
def test_cli_onnx_errors_are_one_line(argv, message, tmp_path, capsys):
    _onnx()
    source = _checkpoint(tmp_path)
    (tmp_path / "empty.onnx").touch()
    argv = [a.replace("CKPT", str(source)).replace("OUT", str(tmp_path / "out")).replace("EMPTY", str(tmp_path / "empty.onnx"))
            for a in argv]
    code, _, err = _run(capsys, argv[0], "--checkpoint", source, *argv[1:])
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
