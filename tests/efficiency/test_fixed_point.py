"""Fixed-point emulation: the format against an exact rational reference, the quantised model against the
float model, every stored activation on the grid, and ``m3vit eval --fixed-point``."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import m3vit
from m3vit.cli import main
from m3vit.efficiency.fixed_point import FixedPoint, fold_batchnorm, metric_delta, quantize_model
from m3vit.engine import builders
from m3vit.engine.config import load_config
from m3vit.models import save_checkpoint

F64 = torch.float64


def q(fmt: FixedPoint, values) -> list[float]:
    return fmt.quantize(torch.tensor(values, dtype=F64)).tolist()


def reference(fmt: FixedPoint, x: float) -> float:
    """Exact rational arithmetic: scale by 2^F, round (Python rounds Fractions half to even), handle overflow."""
    scaled = Fraction(x) * 2 ** fmt.fraction_bits
    n = round(scaled) if fmt.rounding == "nearest" else math.floor(scaled)
    lo = -(2 ** (fmt.total_bits - 1)) if fmt.signed else 0
    hi = 2 ** (fmt.total_bits - 1) - 1 if fmt.signed else 2 ** fmt.total_bits - 1
    if fmt.overflow == "saturate":
        n = min(max(n, lo), hi)
    else:
        n = (n - lo) % 2 ** fmt.total_bits + lo
    return float(Fraction(n, 2 ** fmt.fraction_bits))


# ----------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------
def test_issue_default_formats_by_hand():
    weight, act, bias = FixedPoint(16, 2), FixedPoint(32, 10), FixedPoint(16, 5)
    # ap_fixed<16,2>: 1 sign bit + 1 integer bit + 14 fraction bits
    assert (weight.fraction_bits, weight.step, weight.min, weight.max) == (14, 1 / 16384, -2.0, 2.0 - 1 / 16384)
    # ap_fixed<32,10>: 1 sign bit + 9 integer bits + 22 fraction bits
    assert (act.fraction_bits, act.step, act.min, act.max) == (22, 2.0 ** -22, -512.0, 512.0 - 2.0 ** -22)
    assert (bias.step, bias.min, bias.max) == (1 / 2048, -16.0, 16.0 - 1 / 2048)
    unsigned = FixedPoint(8, 0, signed=False)
    assert (unsigned.min, unsigned.max, unsigned.step) == (0.0, 255 / 256, 1 / 256)
    assert str(weight) == "ap_fixed<16,2>" and str(unsigned) == "ap_ufixed<8,0>"
    d = act.to_dict()
    assert d["min"] == -512.0 and d["fraction_bits"] == 22 and d["rounding"] == "nearest"


def test_representable_values_are_unchanged():
    for fmt in (FixedPoint(16, 2), FixedPoint(32, 10), FixedPoint(8, 0, signed=False), FixedPoint(53, 20)):
        ints = torch.tensor([fmt.min_int, fmt.min_int + 1, -1, 0, 1, 12345, fmt.max_int - 1, fmt.max_int], dtype=F64)
        ints = ints.clamp(fmt.min_int, fmt.max_int)
        values = ints * fmt.step
        assert torch.equal(fmt.quantize(values), values)
        assert fmt.representable(values)
    assert q(FixedPoint(16, 2), [1.5, -0.25, -2.0]) == [1.5, -0.25, -2.0]


def test_between_grid_points_round_to_nearest_ties_to_even():
    fmt = FixedPoint(8, 4)  # step 1/16
    s = fmt.step
    assert q(fmt, [3 * s + 0.25 * s, 3 * s + 0.75 * s, -3 * s - 0.25 * s, -3 * s - 0.75 * s]) == [3 * s, 4 * s, -3 * s, -4 * s]
    # ties go to the even multiple of the step
    assert q(fmt, [2.5 * s, 3.5 * s, -2.5 * s, -3.5 * s, 0.5 * s]) == [2 * s, 4 * s, -2 * s, -4 * s, 0.0]


def test_floor_rounding_truncates_towards_minus_infinity():
    fmt = FixedPoint(8, 4, rounding="floor")
    s = fmt.step
    assert q(fmt, [3.75 * s, 3.5 * s, -0.25 * s, -3.5 * s]) == [3 * s, 3 * s, -s, -4 * s]


def test_saturation_at_the_extremes():
    fmt = FixedPoint(16, 2)
    got = q(fmt, [2.0, 1e9, -2.0 - fmt.step, -1e9, math.inf, -math.inf, fmt.max + fmt.step / 4])
    assert got == [fmt.max, fmt.max, fmt.min, fmt.min, fmt.max, fmt.min, fmt.max]
    # the largest value rounds down into range without counting as saturated
    out, count = fmt.quantize_with_count(torch.tensor([fmt.max + fmt.step / 4, 5.0, -5.0, 0.1], dtype=F64))
    assert count == 2
    assert math.isnan(q(fmt, [math.nan])[0])


def test_wrap_is_twos_complement():
    signed, unsigned = FixedPoint(4, 4, overflow="wrap"), FixedPoint(4, 4, signed=False, overflow="wrap")
    assert q(signed, [7.0, 8.0, 9.0, -8.0, -9.0, 16.0, 23.0]) == [7.0, -8.0, -7.0, -8.0, 7.0, 0.0, 7.0]
    assert q(unsigned, [15.0, 16.0, -1.0, 33.0]) == [15.0, 0.0, 15.0, 1.0]


@st.composite
def format_and_value(draw):
    signed = draw(st.booleans())
    total = draw(st.integers(2, 53))
    fmt = FixedPoint(total, draw(st.integers(0, total)), signed=signed,
                     rounding=draw(st.sampled_from(["nearest", "floor"])),
                     overflow=draw(st.sampled_from(["saturate", "wrap"])))
    if draw(st.booleans()) and total <= 48:  # near the grid and the range ends
        n = draw(st.integers(2 * fmt.min_int - 4, 2 * fmt.max_int + 4))
        x = (n + draw(st.sampled_from([0, 0.25, 0.5, 0.75]))) * fmt.step
    else:
        x = draw(st.floats(-1e200, 1e200, allow_nan=False))
    return fmt, x


@settings(max_examples=300, deadline=None)
@given(format_and_value())
@example((FixedPoint(53, 0), 0.49999999999999994))
@example((FixedPoint(2, 2, overflow="wrap"), -3.0))
def test_quantize_matches_exact_rational_reference(case):
    fmt, x = case
    assert q(fmt, [x]) == [reference(fmt, x)]


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 53).flatmap(lambda w: st.tuples(st.just(w), st.integers(0, w))),
       st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20),
       st.sampled_from(["nearest", "floor"]))
def test_error_bound_idempotence_and_monotonicity(bits, values, rounding):
    fmt = FixedPoint(*bits, rounding=rounding)
    x = torch.tensor(values, dtype=F64)
    qx = fmt.quantize(x)
    assert torch.equal(fmt.quantize(qx), qx)
    inside = (x >= fmt.min) & (x <= fmt.max)
    if rounding == "nearest":  # float subtraction rounds monotonically, so the bound survives it
        assert bool(((qx - x)[inside].abs() <= fmt.step / 2).all())
    else:  # compared without subtracting: qx + step is on the grid and exact
        assert bool(((qx <= x) & (qx + fmt.step > x))[inside].all())
    order = torch.argsort(x)
    assert bool((qx[order].diff() >= 0).all())
    assert bool(((qx >= fmt.min) & (qx <= fmt.max)).all())


def test_float32_input_keeps_its_dtype_and_is_the_rounded_float64_result():
    fmt = FixedPoint(32, 10)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 300
    out = fmt.quantize(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, fmt.quantize(x.double()).float())


@pytest.mark.parametrize("args, message", [
    ((1, 0), "total bits must be between 2 and 53"),
    ((54, 2), "total bits must be between 2 and 53"),
    ((16, 17), "integer bits must be between 0 and the total bits (16)"),
    ((16, -1), "integer bits must be between 0"),
])
def test_bad_formats_raise_naming_the_field(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FixedPoint(*args)


def test_bad_modes_and_types():
    with pytest.raises(ValueError, match="rounding='up'.*nearest"):
        FixedPoint(16, 2, rounding="up")
    with pytest.raises(ValueError, match="overflow='clip'.*saturate"):
        FixedPoint(16, 2, overflow="clip")
    with pytest.raises(TypeError, match="total_bits must be an int"):
        FixedPoint(16.0, 2)
    with pytest.raises(TypeError, match="floating-point tensor"):
        FixedPoint(16, 2).quantize(torch.arange(3))
    FixedPoint(1, 1, signed=False)  # one unsigned bit is a valid format


# ----------------------------------------------------------------------------------------------
# The quantised model
# ----------------------------------------------------------------------------------------------
TASKS = {"semseg": 5, "depth": 1}


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(embed_dim=32, depth=2, num_heads=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8)
    model = m3vit.create_model("m3vit_micro", TASKS, img_size=(32, 32), **(args | overrides)).eval()
    with torch.no_grad():  # give the BatchNorms non-trivial statistics so that folding matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_error(model, fixed, x) -> tuple[float, float]:
    with torch.no_grad():
        ref = model(x)
    out = fixed(x)
    err = max(float((out[t] - ref[t].double()).abs().max()) for t in ref)
    scale = max(float(ref[t].abs().max()) for t in ref)
    return err, scale


def test_float_model_is_not_modified_and_the_copy_is_float64():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = quantize_model(model)
    fixed(images())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.dtype == F64 and not p.requires_grad for p in fixed.parameters())


def test_weights_lie_on_their_formats_grid():
    model = tiny_model()
    weight, bias, norm = FixedPoint(16, 2), FixedPoint(16, 5), FixedPoint(12, 4)
    fixed = quantize_model(model, weight, FixedPoint(32, 10), bias_format=bias, norm_format=norm)
    kinds = {name: r["kind"] for name, r in fixed.weight_report.items()}
    assert kinds["backbone.blocks.1.mlp.w1"] == kinds["backbone.blocks.1.mlp.w2"] == "weight"
    assert kinds["backbone.blocks.1.mlp.router.weight"] == kinds["backbone.blocks.0.attn.qkv.weight"] == "weight"
    assert kinds["backbone.blocks.1.mlp.b1"] == kinds["backbone.blocks.0.attn.qkv.bias"] == "bias"
    assert kinds["backbone.pos_embed"] == kinds["backbone.cls_token"] == "bias"
    assert kinds["backbone.blocks.0.norm1.weight"] == kinds["heads.depth.norm.bias"] == "norm"
    formats = {"weight": weight, "bias": bias, "norm": norm}
    for name, param in fixed.model.named_parameters():
        fmt = formats[kinds[name]]
        assert fmt.representable(param), name
        steps = param / fmt.step
        assert torch.equal(steps, steps.round()), name
    # every BatchNorm (conv3x3 + BN in each head stage) was folded into its convolution
    assert len(fixed.folded_batchnorms) == 2 * 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.model.modules())
    assert fixed.model.heads["semseg"].stages[0][0].bias is not None


def test_saturated_weights_are_counted_and_clipped():
    model = tiny_model()
    with torch.no_grad():
        model.backbone.blocks[0].attn.qkv.weight[0, 0] = 5.0
        model.backbone.blocks[0].attn.qkv.weight[0, 1] = -7.0
    fixed = quantize_model(model, FixedPoint(16, 2), None)
    report = fixed.weight_report["backbone.blocks.0.attn.qkv.weight"]
    assert report["saturated"] == 2 and report["max_abs"] == 7.0 and report["format"] == "ap_fixed<16,2>"
    w = fixed.model.backbone.blocks[0].attn.qkv.weight
    assert float(w[0, 0]) == FixedPoint(16, 2).max and float(w[0, 1]) == -2.0
    assert fixed.summary()["weights"]["saturated"] == 2


def test_fold_batchnorm_preserves_the_function():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU()).double().eval()
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[1].running_var.uniform_(0.1, 3)
        seq[1].weight.uniform_(-2, 2)
        seq[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad():
        expected = seq(x)
        assert fold_batchnorm(seq) == ["1"]
        assert isinstance(seq[1], nn.Identity)
        assert torch.allclose(seq(x), expected, atol=1e-12)


def test_quantised_model_is_close_to_the_float_model_and_a_coarse_format_is_not():
    model = tiny_model()
    x = images()
    err, scale = max_error(model, quantize_model(model), x)
    assert 0 < err < 5e-3 * scale  # 16-bit weights: step 6e-5, a few steps' worth of error at the outputs
    # activations alone in ap_fixed<32,10> (weights in float64): error near the activation step
    err_act, _ = max_error(model, quantize_model(model, None, FixedPoint(32, 10), bias_format=None), x)
    assert 0 < err_act < 1e-4 * scale
    coarse = quantize_model(model, FixedPoint(4, 1), FixedPoint(6, 3), bias_format=FixedPoint(4, 2))
    err_coarse, _ = max_error(model, coarse, x)
    assert err_coarse > 0.3 * scale


class _Spy(TorchDispatchMode):
    """Records every floating output of every operator, as the (outer) quantiser hands it back."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = out[0] if isinstance(out, (tuple, list)) and name.startswith(("native_", "_scaled_dot")) else out
        for value in first if isinstance(first, (tuple, list)) else [first]:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and "empty" not in name:
                with _disable_current_modes():  # a copy made through the quantiser would be rounded
                    self.outputs.append((name, value.clone()))
        return out


@pytest.mark.parametrize("dispatch", ["per_expert", "batched"])
def test_every_stored_activation_is_on_the_activation_grid(dispatch):
    model = tiny_model(dispatch=dispatch)
    act = FixedPoint(20, 6)  # coarse enough that unrounded float64 results would be off the grid
    fixed = quantize_model(model, FixedPoint(16, 2), act)
    spy = _Spy()
    # Entered inside the quantiser (which FixedPointModel.forward enters first), the spy sees each result
    # after the quantiser has handled it.
    fixed.model.register_forward_pre_hook(lambda module, args: (spy.__enter__(), None)[1])
    fixed.model.register_forward_hook(lambda module, args, out: (spy.__exit__(None, None, None), None)[1])
    out = fixed(images())
    names = {name for name, _ in spy.outputs}
    assert {"gelu", "native_layer_norm", "convolution", "add", "upsample_bilinear2d"} <= names
    assert names & {"addmm", "baddbmm"} and names & {"_softmax", "softmax"}
    hidden = model.backbone.blocks[1].mlp.hidden_dim  # 32 here; the dense MLP of block 0 is 128 wide
    assert hidden != model.backbone.blocks[0].mlp.fc1.out_features
    assert any(n in ("gelu", "gelu_") and v.shape[-1] == hidden for n, v in spy.outputs), "no expert hidden layer seen"
    for name, value in spy.outputs:
        assert act.representable(value), name
    for value in out.values():
        assert value.dtype == F64 and act.representable(value)


def test_activation_saturation_is_reported_per_module_and_resets():
    model = tiny_model()
    fixed = quantize_model(model, None, FixedPoint(16, 1), bias_format=None)  # activations in [-1, 1)
    fixed(images())
    report = fixed.activation_report()
    norm = report["backbone.blocks.0.norm1"]
    assert norm["saturated"] > 0 and norm["max_abs"] > 1.0
    summary = fixed.summary()["activations"]
    assert summary["saturated"] == sum(r["saturated"] for r in report.values())
    assert set(summary["saturated_modules"]) == {n for n, r in report.items() if r["saturated"]}
    values = summary["values"]
    fixed(images())
    assert fixed.summary()["activations"]["values"] == 2 * values
    fixed.reset_activation_report()
    assert fixed.activation_report() == {}


def test_quantised_model_evaluates_like_a_model():
    model = tiny_model()
    fixed = quantize_model(model)
    assert fixed.config == model.config and fixed.resolve_tasks(None) == ["semseg", "depth"]
    out = fixed(images(1), tasks=["depth"])
    assert list(out) == ["depth"] and out["depth"].shape == (1, 1, 32, 32)


def test_metric_delta():
    ref = {"semseg": {"mIoU": 50.0, "pixel_acc": 80.0}, "depth": {"rmse": 1.0}}
    other = {"semseg": {"mIoU": 49.5, "pixel_acc": 80.25}, "depth": {"rmse": 1.5}, "sal": {"maxF": 1.0}}
    assert metric_delta(ref, other) == {"semseg": {"mIoU": -0.5, "pixel_acc": 0.25}, "depth": {"rmse": 0.5}}


# ----------------------------------------------------------------------------------------------
# m3vit eval --fixed-point
# ----------------------------------------------------------------------------------------------
RUN = {"model.name": "m3vit_micro", "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
       "model.moe_blocks": [1], "model.num_experts": 4, "model.top_k": 2, "model.head_channels": 8,
       "data.size": [32, 32], "data.val_length": 2, "data.tasks": ["semseg", "sal", "depth"],
       "eval.edge_thresholds": 3, "eval.batch_size": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, RUN)
    dataset = builders.build_eval_dataset(cfg)
    torch.manual_seed(0)
    model = builders.build_model(cfg, dataset.task_channels)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "moe", extra={"run": cfg.to_dict(), "step": 3})


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_fixed_point_json_has_per_task_deltas(checkpoint, capsys):
    code, out, err = run_cli(["eval", "--checkpoint", checkpoint, "--json"], capsys)
    assert code == 0, err
    plain = json.loads(out)
    assert "fixed_point" not in plain
    code, out, err = run_cli(["eval", "--checkpoint", checkpoint, "--json", "--fixed-point"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["metrics"] == plain["metrics"]
    block = report["fixed_point"]
    assert block["formats"]["weight"]["format"] == "ap_fixed<16,2>"
    assert block["formats"]["activation"]["format"] == "ap_fixed<32,10>"
    assert block["formats"]["bias"]["format"] == "ap_fixed<16,5>"
    assert set(block["delta"]) == set(plain["metrics"]) == {"semseg", "sal", "depth"}
    for task, metrics in plain["metrics"].items():
        assert set(block["delta"][task]) == set(metrics)
        for metric, value in metrics.items():
            assert block["delta"][task][metric] == block["metrics"][task][metric] - value
    assert block["saturation"]["weights"]["saturated"] == 0


def test_cli_eval_fixed_point_table_and_custom_bits(checkpoint, capsys, tmp_path):
    out_file = tmp_path / "fx.json"
    code, out, err = run_cli(["eval", "--checkpoint", checkpoint, "--fixed-point", "--weight-bits", "6",
                              "--weight-int-bits", "1", "--act-bits", "12", "--act-int-bits", "5",
                              "--rounding", "floor", "--out", out_file], capsys)
    assert code == 0, err
    assert "fixed point: weights ap_fixed<6,1>, biases and norms ap_fixed<16,5>, activations ap_fixed<12,5>" in out
    assert "round floor" in out and "saturated:" in out
    assert any(line.split("|")[-1].strip() == "change" for line in out.splitlines())
    rows = [line for line in out.splitlines() if line.startswith("semseg ") and "mIoU" in line]
    assert len(rows) == 2  # the plain table row and the fixed-point row
    saved = json.loads(out_file.read_text())
    assert saved["fixed_point"]["formats"]["weight"]["total_bits"] == 6
    assert saved["fixed_point"]["formats"]["activation"]["rounding"] == "floor"


@pytest.mark.parametrize("argv, message", [
    (["--fixed-point", "--weight-bits", "0"], "--weight-bits 0 --weight-int-bits 2: fixed-point total bits"),
    (["--fixed-point", "--act-int-bits", "40"], "--act-bits 32 --act-int-bits 40: fixed-point integer bits"),
    (["--fixed-point", "--bias-bits", "60"], "--bias-bits 60 --bias-int-bits 5"),
    (["--weight-bits", "8"], "--weight-bits sets a fixed-point format; add --fixed-point"),
    (["--fixed-point", "--weight-bits", "x"], "invalid int value"),
    (["--fixed-point", "--overflow", "clip"], "invalid choice"),
])
def test_cli_bad_bit_settings_are_one_line_errors(checkpoint, capsys, argv, message):
    code, out, err = run_cli(["eval", "--checkpoint", checkpoint, *argv], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and message in err and "Traceback" not in err
