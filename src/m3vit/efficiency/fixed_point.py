"""Fixed-point emulation of the accelerator's number formats: quantise a trained model's weights and activations.

The public M³ViT FPGA design (Edge-MoE, Vitis HLS) stores feature maps as ``ap_fixed<32,10>`` and
linear-layer weights as ``ap_fixed<16,2>`` (biases and LayerNorm parameters as ``ap_fixed<16,5>``).
``FixedPoint`` is such a format and ``quantize_model`` emulates a model running in it:

* **Format convention** (HLS ``ap_fixed<W, I>``): ``total_bits`` W, ``integer_bits`` I *including*
  the sign bit when signed, ``fraction_bits = W - I``. Signed values are the integers
  ``-2^(W-1) .. 2^(W-1) - 1`` times ``step = 2^-(W-I)``: ``ap_fixed<16,2>`` spans ``[-2, 2 - 2^-14]``,
  ``ap_fixed<32,10>`` spans ``[-512, 512 - 2^-22]``. Unsigned (``ap_ufixed``) spans ``[0, 2^I - step]``.
* **Rounding** ``"nearest"`` (default): to the nearest grid point, ties to even (HLS ``AP_RND_CONV``,
  unbiased); ``"floor"``: towards minus infinity (HLS ``AP_TRN``, the ``ap_fixed`` default).
  **Overflow** ``"saturate"`` (default, HLS ``AP_SAT``): clip to ``[min, max]``; ``"wrap"`` (HLS
  ``AP_WRAP``, the ``ap_fixed`` default): keep the low W bits (two's complement wrap-around).
  Plain ``ap_fixed<W, I>`` in HLS code is ``floor`` + ``wrap``; ``nearest`` + ``saturate`` is what a
  conversion of trained float weights into the design should use, and the default here.
* **Exactness**: quantisation is computed in float64, which holds every value of a format of up to
  53 bits exactly. ``quantize`` returns the input's dtype: a float32 tensor cannot hold the 22
  fraction bits of a large ``ap_fixed<32,10>`` value, so the emulated model runs in float64.

``quantize_model`` returns an emulated float64 copy (the float model is not touched):

* **Weights**: matrices (Linear/Conv weights, stacked expert ``w1``/``w2``, router gates) use the
  weight format; biases (``*.bias``, expert ``b1``/``b2``) and the additive embeddings (``pos_embed``,
  ``cls_token``) use the bias format; LayerNorm/BatchNorm affine parameters use the norm format.
  BatchNorm that follows a convolution in an ``nn.Sequential`` is first folded into it, as an
  inference accelerator does (scale into the weights, shift into a bias); a BatchNorm that cannot be
  folded keeps float running statistics.
* **Activations**: the result of *every* floating-point operation in the forward (every PyTorch
  operator the model dispatches: GEMMs, the attention kernel, softmax, LayerNorm, GELU, the
  residual adds, interpolation, and inside the MoE dispatch the hidden layer between the two
  expert GEMMs, the gated expert outputs and their accumulation) is rounded to the activation
  format, so every tensor the hardware would store is on its grid. A GEMM accumulates in float64
  (a wide accumulator) and its result is rounded once; operators that only move or view values are
  left alone. Integer tensors (routing indices) are untouched.
* **Saturation report**: per parameter and per module (the innermost module running the operator),
  how many values were clipped and the largest magnitude seen, to size the integer bits.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FixedPoint",
    "FixedPointModel",
    "ROUNDINGS",
    "OVERFLOWS",
    "DEFAULT_WEIGHT",
    "DEFAULT_BIAS",
    "DEFAULT_ACTIVATION",
    "quantize_model",
    "fold_batchnorm",
    "metric_delta",
    "fixed_point_text",
]

log = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "floor")
OVERFLOWS = ("saturate", "wrap")
# float64 has a 53-bit significand: every integer count of steps of a format up to 53 bits is exact.
MAX_TOTAL_BITS = 53


@dataclass(frozen=True)
class FixedPoint:
    """A fixed-point format ``ap_fixed<total_bits, integer_bits>`` (``ap_ufixed`` when unsigned).

    ``integer_bits`` include the sign bit of a signed format (HLS convention); ``fraction_bits =
    total_bits - integer_bits``. ``quantize(x)`` rounds to the grid ``step = 2^-fraction_bits``
    (``rounding``: ``"nearest"`` ties-to-even, or ``"floor"``) and handles values outside
    ``[min, max]`` by ``overflow``: ``"saturate"`` (clip) or ``"wrap"`` (two's complement).
    """

    total_bits: int
    integer_bits: int
    signed: bool = True
    rounding: str = "nearest"
    overflow: str = "saturate"

    def __post_init__(self) -> None:
        for name in ("total_bits", "integer_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"fixed-point {name} must be an int, got {value!r}")
        low = 2 if self.signed else 1
        if not low <= self.total_bits <= MAX_TOTAL_BITS:
            raise ValueError(f"fixed-point total bits must be between {low} and {MAX_TOTAL_BITS} "
                             f"({'signed' if self.signed else 'unsigned'}), got {self.total_bits}")
        if not 0 <= self.integer_bits <= self.total_bits:
            raise ValueError(f"fixed-point integer bits must be between 0 and the total bits ({self.total_bits}), "
                             f"got {self.integer_bits}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r} is not a rounding mode; choose one of {list(ROUNDINGS)}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow={self.overflow!r} is not an overflow mode; choose one of {list(OVERFLOWS)}")

    # ------------------------------------------------------------------ the grid
    @property
    def fraction_bits(self) -> int:
        return self.total_bits - self.integer_bits

    @property
    def step(self) -> float:
        """Distance between neighbouring representable values, ``2^-fraction_bits``."""
        return math.ldexp(1.0, -self.fraction_bits)

    @property
    def min_int(self) -> int:
        """Smallest representable value in units of ``step``."""
        return -(1 << (self.total_bits - 1)) if self.signed else 0

    @property
    def max_int(self) -> int:
        """Largest representable value in units of ``step``."""
        return (1 << (self.total_bits - (1 if self.signed else 0))) - 1

    @property
    def min(self) -> float:
        return math.ldexp(float(self.min_int), -self.fraction_bits)

    @property
    def max(self) -> float:
        return math.ldexp(float(self.max_int), -self.fraction_bits)

    def __str__(self) -> str:
        return f"ap_{'' if self.signed else 'u'}fixed<{self.total_bits},{self.integer_bits}>"

    def describe(self) -> str:
        """One line: the format, its step and range, rounding and overflow."""
        return (f"{self} (step 2^-{self.fraction_bits}, range [{self.min:g}, {self.max:.10g}], "
                f"{self.rounding}, {self.overflow})")

    def to_dict(self) -> dict[str, Any]:
        return {"format": str(self), "total_bits": self.total_bits, "integer_bits": self.integer_bits,
                "fraction_bits": self.fraction_bits, "signed": self.signed, "rounding": self.rounding,
                "overflow": self.overflow, "step": self.step, "min": self.min, "max": self.max}

    # ------------------------------------------------------------------ quantisation
    def to_steps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` in float64 units of ``step``, rounded and overflow-handled; and the mask of overflowed values."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"quantize expects a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        scaled = torch.ldexp(x.to(torch.float64), torch.tensor(self.fraction_bits, dtype=torch.float64,
                                                                device=x.device))
        steps = torch.round(scaled) if self.rounding == "nearest" else torch.floor(scaled)
        overflowed = (steps < self.min_int) | (steps > self.max_int)
        if self.overflow == "saturate":
            steps = steps.clamp(self.min_int, self.max_int)
        else:
            span = float(1 << self.total_bits)
            steps = torch.fmod(steps, span)  # exact for any float64 integer
            steps = torch.where(steps < 0, steps + span, steps)
            if self.signed:
                steps = torch.where(steps > self.max_int, steps - span, steps)
        return steps, overflowed

    def quantize(self, x: Tensor) -> Tensor:
        """``x`` rounded to this format's grid and range, in ``x``'s dtype (exact when that is float64).

        NaN stays NaN; infinities saturate to ``min``/``max`` (and become NaN when wrapping).
        """
        return self.quantize_with_count(x)[0]

    def quantize_with_count(self, x: Tensor) -> tuple[Tensor, int]:
        """``(quantize(x), number of values that were out of range)``."""
        steps, overflowed = self.to_steps(x)
        out = torch.ldexp(steps, torch.tensor(-self.fraction_bits, dtype=torch.float64, device=steps.device))
        return out.to(x.dtype), int(overflowed.sum())

    def representable(self, x: Tensor) -> bool:
        """Whether every value of ``x`` lies on this format's grid and in its range."""
        x64 = x.to(torch.float64)
        return bool(torch.equal(self.quantize(x64), x64))


#: The public FPGA design's formats: linear weights, biases / norm parameters, feature maps.
DEFAULT_WEIGHT = FixedPoint(16, 2)
DEFAULT_BIAS = FixedPoint(16, 5)
DEFAULT_ACTIVATION = FixedPoint(32, 10)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_ADDITIVE = ("pos_embed", "cls_token")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every eval-mode BatchNorm that directly follows a convolution in an ``nn.Sequential`` into it.

    The convolution gets ``weight * s`` and a bias ``(bias - mean) * s + beta`` with ``s = gamma /
    sqrt(var + eps)``; the BatchNorm becomes ``nn.Identity``. Modifies ``model`` in place; returns the
    names of the folded BatchNorms.
    """
    folded = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.modules.conv._ConvNd) and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
                continue
            if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var.to(conv.weight.dtype) + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -bn.running_mean.to(conv.weight.dtype) * scale
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                if bn.bias is not None:
                    shift = shift + bn.bias
                conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
                conv.bias = nn.Parameter(shift, requires_grad=conv.weight.requires_grad)
            setattr(seq, bn_name, nn.Identity())
            folded.append(f"{seq_name}.{bn_name}" if seq_name else bn_name)
    return folded


def _parameter_kind(model: nn.Module, name: str) -> str:
    """``"norm"``, ``"bias"`` or ``"weight"``: which format a parameter is stored in."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, _NORMS):
        return "norm"
    if leaf == "bias" or leaf in ("b1", "b2") or leaf in _ADDITIVE:
        return "bias"
    return "weight"


# ---------------------------------------------------------------------------------------------
# Activations: every floating-point operator result rounded to the activation format
# ---------------------------------------------------------------------------------------------
@dataclass
class _ModuleStats:
    values: int = 0
    saturated: int = 0
    max_abs: float = 0.0


class _ActivationQuantizer(TorchDispatchMode):
    """Rounds the floating outputs of every operator with a floating tensor input; records saturation.

    Fresh outputs are replaced by their quantised values, outputs written in place (``add_``,
    ``out=``) are quantised in place, and views are left alone (their base is already quantised).
    """

    def __init__(self, fmt: FixedPoint, stats: dict[str, _ModuleStats], scope: list[str]):
        super().__init__()
        self.fmt, self.stats, self.scope = fmt, stats, scope

    def _record(self, value: Tensor, count: int) -> None:
        name = self.scope[-1] if self.scope else ""
        entry = self.stats.setdefault(name, _ModuleStats())
        entry.values += value.numel()
        entry.saturated += count
        if value.numel():
            finite = value[torch.isfinite(value)] if not bool(torch.isfinite(value).all()) else value
            if finite.numel():
                entry.max_abs = max(entry.max_abs, float(finite.abs().max()))

    def _quantize(self, value: Tensor) -> Tensor:
        out, count = self.fmt.quantize_with_count(value)
        self._record(value, count)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _UNINITIALISED or not (_has_floating_tensor(args) or _has_floating_tensor(kwargs.values())):
            return out  # factories (zeros, eye, ...), uninitialised buffers and pure integer ops
        returns = func._schema.returns
        single = not isinstance(out, (tuple, list))
        outs = [out] if single else list(out)
        if func.overloadpacket.__name__ in _STATISTICS_AFTER_FIRST:
            outs, rest = outs[:1], outs[1:]
        else:
            rest = []
        for i, value in enumerate(outs):
            alias = returns[i].alias_info if i < len(returns) else None
            if alias is not None and not alias.is_write:
                continue  # a view of an input: nothing new to round
            if isinstance(value, Tensor) and value.is_floating_point():
                if alias is not None:  # written in place / out=
                    value.copy_(self._quantize(value))
                else:
                    outs[i] = self._quantize(value)
            elif isinstance(value, (list, tuple)) and alias is None:
                outs[i] = type(value)(self._quantize(v) if isinstance(v, Tensor) and v.is_floating_point() else v
                                      for v in value)
        if single:
            return outs[0]
        outs += rest
        return type(out)(outs) if isinstance(out, tuple) else outs


# Operators whose output holds no values yet (it is written later, and quantised then).
_UNINITIALISED = frozenset(op for op in (
    torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default, torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty.memory_format,
))


# Operators whose outputs after the first are statistics saved for backward (mean, 1/std,
# log-sum-exp), not activations: only their first output is rounded.
_STATISTICS_AFTER_FIRST = frozenset((
    "native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
))


def _has_floating_tensor(values) -> bool:
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            return True
        if isinstance(v, (list, tuple)) and _has_floating_tensor(v):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The emulated model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Formats:
    weight: FixedPoint | None
    bias: FixedPoint | None
    norm: FixedPoint | None
    activation: FixedPoint | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if v is None else v.to_dict()) for k, v in
                (("weight", self.weight), ("bias", self.bias), ("norm", self.norm), ("activation", self.activation))}


class FixedPointModel(nn.Module):
    """A float64 copy of a multi-task model with fixed-point weights that computes in fixed point.

    ``forward(images, tasks=None)`` casts the images to float64, runs the copy with every operator
    result rounded to the activation format (inference only: no gradients), and returns float64
    outputs. ``config``, ``tasks``, ``resolve_tasks`` and ``moe_layers`` are the wrapped model's,
    so ``engine.evaluator.evaluate`` takes it as it takes the float model. ``weight_report`` holds the
    per-parameter quantisation statistics; ``activation_report()`` the per-module ones accumulated
    over every forward since construction or ``reset_activation_report()``.
    """

    def __init__(self, model: nn.Module, formats: _Formats, weight_report: dict[str, dict[str, Any]],
                 folded: list[str]):
        super().__init__()
        self.model = model
        self.formats = formats
        self.weight_report = weight_report
        self.folded_batchnorms = folded
        self._stats: dict[str, _ModuleStats] = {}
        self._scope: list[str] = []
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._enter(name))
            module.register_forward_hook(self._leave)

    def _enter(self, name: str):
        def hook(module, args):
            self._scope.append(name)
        return hook

    def _leave(self, module, args, output):
        if self._scope:
            self._scope.pop()

    # ------------------------------------------------------------------ delegation
    @property
    def config(self):
        return self.model.config

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    @property
    def moe_layers(self):
        return self.model.moe_layers

    def resolve_tasks(self, tasks):
        return self.model.resolve_tasks(tasks)

    # ------------------------------------------------------------------ running
    def forward(self, images: Tensor, tasks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        self._scope.clear()
        with torch.no_grad():
            images = images.to(torch.float64)
            fmt = self.formats.activation
            if fmt is None:
                return self.model(images, tasks=tasks)
            images = fmt.quantize(images)
            with _ActivationQuantizer(fmt, self._stats, self._scope):
                return self.model(images, tasks=tasks)

    def activation_report(self) -> dict[str, dict[str, float | int]]:
        """Per module (innermost module running the operator): ``values`` rounded, ``saturated``, ``max_abs``."""
        return {name or "<model>": {"values": s.values, "saturated": s.saturated, "max_abs": s.max_abs}
                for name, s in self._stats.items()}

    def reset_activation_report(self) -> None:
        self._stats.clear()

    def summary(self) -> dict[str, Any]:
        """Formats, saturation totals and the modules / parameters that saturated, as a JSON-able dict."""
        acts = self.activation_report()
        weights = self.weight_report
        return {
            "formats": self.formats.to_dict(),
            "folded_batchnorms": len(self.folded_batchnorms),
            "weights": {"values": sum(w["values"] for w in weights.values()),
                        "saturated": sum(w["saturated"] for w in weights.values()),
                        "max_abs": max((w["max_abs"] for w in weights.values()), default=0.0),
                        "saturated_parameters": {n: w for n, w in weights.items() if w["saturated"]}},
            "activations": {"values": sum(a["values"] for a in acts.values()),
                            "saturated": sum(a["saturated"] for a in acts.values()),
                            "max_abs": max((a["max_abs"] for a in acts.values()), default=0.0),
                            "saturated_modules": {n: a for n, a in acts.items() if a["saturated"]}},
        }


def quantize_model(model: nn.Module, weight_format: FixedPoint | None = DEFAULT_WEIGHT,
                   activation_format: FixedPoint | None = DEFAULT_ACTIVATION, *,
                   bias_format: FixedPoint | None = DEFAULT_BIAS, norm_format: FixedPoint | None = None,
                   fold_batchnorms: bool = True) -> FixedPointModel:
    """An emulated fixed-point copy of ``model`` (which is left unchanged).

    ``weight_format`` stores weight matrices, ``bias_format`` biases and additive embeddings,
    ``norm_format`` (default: ``bias_format``) normalisation parameters; ``activation_format`` every
    operator result. ``None`` leaves that kind in float64. With ``fold_batchnorms`` eval-mode
    BatchNorms after convolutions are folded first (see ``fold_batchnorm``).
    """
    for label, fmt in (("weight_format", weight_format), ("activation_format", activation_format),
                       ("bias_format", bias_format), ("norm_format", norm_format)):
        if fmt is not None and not isinstance(fmt, FixedPoint):
            raise TypeError(f"{label} must be a FixedPoint or None, got {type(fmt).__name__}")
    if norm_format is None:
        norm_format = bias_format
    formats = _Formats(weight_format, bias_format, norm_format, activation_format)
    emulated = copy.deepcopy(model).to(torch.float64).eval()
    emulated.requires_grad_(False)
    folded = fold_batchnorm(emulated) if fold_batchnorms else []
    report: dict[str, dict[str, Any]] = {}
    by_kind = {"weight": weight_format, "bias": bias_format, "norm": norm_format}
    with torch.no_grad():
        for name, param in emulated.named_parameters():
            kind = _parameter_kind(emulated, name)
            fmt = by_kind[kind]
            max_abs = float(param.abs().max()) if param.numel() else 0.0
            saturated = 0
            if fmt is not None:
                quantized, saturated = fmt.quantize_with_count(param)
                param.copy_(quantized)
            report[name] = {"kind": kind, "format": None if fmt is None else str(fmt), "values": param.numel(),
                            "saturated": saturated, "max_abs": max_abs}
            if saturated:
                log.info("%s: %d of %d values saturated to %s (largest magnitude %.4g)", name, saturated,
                         param.numel(), fmt, max_abs)
    return FixedPointModel(emulated, formats, report, folded)


def metric_delta(reference: Mapping[str, Mapping[str, float]],
                 other: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: other - reference}}`` over the tasks and metrics both hold."""
    return {task: {m: float(other[task][m]) - float(v) for m, v in values.items() if m in other.get(task, {})}
            for task, values in reference.items() if task in other}


def fixed_point_text(block: Mapping[str, Any]) -> str:
    """The ``fixed_point`` block of ``m3vit eval --fixed-point`` as text: the formats, a table of each task's
    headline metrics in float and in fixed point, then one line of saturation counts."""
    from ..utils.tables import format_table
    from ..tasks.registry import task_class

    f = block["formats"]
    lines = [f"fixed point: weights {f['weight']['format']}, biases and norms {f['bias']['format']}, activations "
             f"{f['activation']['format']} (round {f['weight']['rounding']}, {f['weight']['overflow']} on overflow):"]
    rows = []
    for task, deltas in block["delta"].items():
        cls = task_class(task)
        for metric in sorted((m for m in deltas if "/" not in m), key=lambda m: m != cls.primary_metric):
            fixed = block["metrics"][task][metric]
            arrow = "↑" if cls.metric_higher_is_better(metric) else "↓"
            rows.append([task, metric + arrow, f"{fixed - deltas[metric]:.4f}", f"{fixed:.4f}",
                         f"{deltas[metric]:+.4f}"])
    lines.append(format_table(["task", "metric", "float", "fixed", "change"], rows))
    sat = block["saturation"]
    worst = max(sat["activations"]["saturated_modules"].items(), key=lambda kv: kv[1]["saturated"], default=None)
    lines.append(f"saturated: {sat['weights']['saturated']} of {sat['weights']['values']} weights, "
                 f"{sat['activations']['saturated']} of {sat['activations']['values']} activation values"
                 + (f" (most in {worst[0]}: {worst[1]['saturated']})" if worst else "")
                 + f"; largest activation magnitude {sat['activations']['max_abs']:.4g}")
    return "\n".join(lines)
