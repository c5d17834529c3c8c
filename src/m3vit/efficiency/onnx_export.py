"""ONNX deployment of one task's pathway: the export form of the MoE layer that keeps top-k sparsity,
the export itself (``export_onnx``), its check against PyTorch with onnxruntime (``check_onnx``) and
int8 quantisation of the exported file (``quantize_onnx``).

**The MoE export form.** ``SparseExportMoE`` is the routed computation written in ops an ONNX graph
has: the layer's own routing, ``MoE.route`` with the task as an ``int`` (ONNX ``TopK``), then for each held expert the token
positions routed to it (``NonZero``: a data-dependent length), a gather of those tokens, the expert
MLP on them only, their combine weights, and an ``index_add`` back (``ScatterND``, ``reduction="add"``).
An expert no token picked runs on zero rows: the expert GEMMs execute ``tokens x top_k`` rows in all,
as PyTorch's dispatch does. ``torch.onnx.export(dynamo=True)`` traces the ``nonzero`` lengths as
unbacked sizes without hints. (A dense-equivalent form, every expert on every token mixed by a
``[tokens, experts]`` weight matrix, was slower at every size measured and was removed; see
``docs/deployment_onnx.md``.) ``MoE.route`` traces as it is: with an ``int`` task a router takes no
data-dependent branch, and the dispatch plan (a host sync) is only built by backends that ask for it.

**Batch axis.** The graph's input is ``images [batch, 3, H, W]`` with a symbolic ``batch`` (traced with
``min=1``; ONNX records no bounds) and its output ``[batch, C, H, W]``; batch 0 gives an empty output.
(The first export's dense-equivalent MoE combined the experts with an ``Einsum`` whose onnxruntime
kernel divides by zero on an empty token axis: SIGFPE.)

**Metadata.** The file records the model config (``m3vit.config``, JSON) and the task (``m3vit.task``),
so ``m3vit.efficiency.onnx_model.OnnxModel`` can evaluate it without the checkpoint.

Needs the optional packages ``onnx`` and ``onnxscript`` (exporter) and ``onnxruntime`` (check, int8).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.io import write_atomic
from ..models import MultiTaskModel
from ..models.modes import eval_mode
from ..nn.moe import MoE
from ..utils.errors import InputError

__all__ = ["QUANTIZATION_METHODS", "ONNX_TOLERANCE", "OnnxError", "OnnxUnavailable",
           "export_routing", "ExportRouter", "SparseExportMoE", "TaskGraph", "export_onnx", "check_onnx",
           "quantize_onnx", "onnx_session", "read_metadata"]

ONNX_TOLERANCE = 1e-4
QUANTIZATION_METHODS = ("static", "dynamic")
METADATA_CONFIG = "m3vit.config"
METADATA_TASK = "m3vit.task"
METADATA_MOE = "m3vit.moe_form"
INPUT_NAME = "images"
# Node metadata the exporter writes that a deployed file does not need (the "namespace" name scope stays:
# ``quantize_onnx`` finds the routing nodes by it).
_DROPPED_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy",
                          "pkg.torch.onnx.name_scopes")


class OnnxError(RuntimeError):
    """ONNX export failed; the message says why in one line."""


class OnnxUnavailable(OnnxError):
    """An optional ONNX package (onnx, onnxscript, onnxruntime) is not installed."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailable(f"ONNX export needs the optional package {module!r} "
                              f"(pip install onnx onnxscript onnxruntime)") from None


# ----------------------------------------------------------------------------------------------
# The MoE export form
# ----------------------------------------------------------------------------------------------


def export_routing(moe: MoE, x: Tensor, task_index: int) -> tuple[Tensor, Tensor]:
    """Top-k routing of tokens ``x [B, N, D]`` for task ``task_index`` (``MoE.route``, which ``torch.export``
    traces): ``weights [B*N, k]`` (float32 or wider) and ``indices [B*N, k]`` into the layer's held experts."""
    routing = moe.route(x, task_index)
    return routing.weights, routing.indices


class ExportRouter(nn.Module):
    """``export_routing`` of one layer and task as a module, so the routing ops of an exported graph are
    recognisable by their name scope (``quantize_onnx`` keeps them in float: routing decisions stay exact)."""

    def __init__(self, moe: MoE, task_index: int):
        super().__init__()
        if moe.capacity_factor is not None:
            raise ValueError("ONNX export supports dropless MoE layers only (capacity_factor=null); this model "
                             f"drops tokens over capacity_factor={moe.capacity_factor}")
        if not 0 <= task_index < moe.num_tasks:
            raise ValueError(f"task index {task_index} is outside the layer's {moe.num_tasks} tasks")
        self.moe, self.task_index = moe, task_index

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return export_routing(self.moe, x, self.task_index)


class SparseExportMoE(nn.Module):
    """Export form of an ``MoE`` layer for one task that keeps top-k sparsity (see the module docstring):
    each held expert runs only on the tokens routed to it, found with a data-dependent ``nonzero``.

    The experts' weights are held per expert (``w1[e]`` ...), so each becomes its own ONNX initializer,
    which the int8 quantiser can quantise (it only quantises a ``MatMul`` whose weight is an initializer).
    """

    def __init__(self, moe: MoE, task_index: int = 0):
        super().__init__()
        self.route = ExportRouter(moe, task_index)
        self.num_experts = moe.num_experts
        for name in ("w1", "b1", "w2", "b2"):
            stacked = getattr(moe, name).detach()
            setattr(self, name, nn.ParameterList(nn.Parameter(w.clone(), requires_grad=False) for w in stacked))

    def forward(self, x: Tensor) -> Tensor:
        batch, num_tokens, dim = x.shape
        weights, indices = self.route(x)
        top_k = indices.shape[1]
        choices, gates = indices.reshape(-1), weights.reshape(-1)  # flat slot s*k + j
        tokens = x.reshape(batch * num_tokens, dim)
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            slots = (choices == e).nonzero().squeeze(1)  # a token picks an expert at most once
            token = torch.div(slots, top_k, rounding_mode="floor")
            hidden = F.gelu(tokens.index_select(0, token) @ self.w1[e] + self.b1[e])
            y = (hidden @ self.w2[e] + self.b2[e]) * gates.index_select(0, slots).unsqueeze(1).to(x.dtype)
            out = out.index_add(0, token, y)
        return out.reshape(batch, num_tokens, dim)


class TaskGraph(nn.Module):
    """``images -> prediction`` of one task of ``model`` (a copy), its MoE layers as ``SparseExportMoE``."""

    def __init__(self, model: MultiTaskModel, task: str | None = None):
        super().__init__()
        self.task = _one_task(model, task)
        task_index = model.tasks.index(self.task)
        self.model = copy.deepcopy(model).cpu().float().eval()
        for block in self.model.backbone.blocks:
            if block.is_moe:
                block.mlp = SparseExportMoE(block.mlp, task_index)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images, tasks=[self.task])[self.task]


def _one_task(model: MultiTaskModel, task: str | None) -> str:
    if task is None:
        if len(model.tasks) != 1:
            raise ValueError(f"the model has tasks {model.tasks}: name the one to export (task=...), or extract "
                             f"it first (extract_task)")
        return model.tasks[0]
    if task not in model.tasks:
        raise ValueError(f"unknown task {task!r}; this model's tasks are {model.tasks}")
    return task


# ----------------------------------------------------------------------------------------------
# Export and check
# ----------------------------------------------------------------------------------------------


def export_onnx(model: MultiTaskModel, path: str | os.PathLike, *, task: str | None = None) -> Path:
    """Write ``task``'s pathway of ``model`` (default: its only task) as ONNX to ``path``, atomically.

    Input ``images [batch, 3, H, W]`` (ImageNet-normalised, ``H, W`` the model's ``img_size``, ``batch``
    dynamic, 0 allowed), output the task's prediction ``[batch, C, H, W]`` named after the task. MoE
    layers are exported as ``SparseExportMoE``; a dense model is exported as it is. Exported with
    ``torch.onnx.export(dynamo=True)``.
    """
    _require("onnx")
    _require("onnxscript")
    graph = TaskGraph(model, task)
    cfg = model.config
    example = torch.randn(2, cfg.in_chans, *cfg.img_size)
    batch = torch.export.Dim("batch", min=1)
    metadata = {METADATA_CONFIG: json.dumps(cfg.to_dict()), METADATA_TASK: graph.task,
                METADATA_MOE: "sparse" if model.moe_layers else "none"}

    def write(tmp: str) -> None:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecation notices
                program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[graph.task], dynamic_shapes=({0: batch},),
                                            external_data=False, verbose=False)
        except Exception as exc:  # the exporter raises many types, with pages of diagnostics
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxError(f"torch.onnx could not export the {graph.task!r} pathway: {first}") from exc
        program.model.metadata_props.update(metadata)
        for node in program.model.graph.all_nodes():  # source locations: kilobytes per node, and local paths
            for key in _DROPPED_NODE_METADATA:
                node.metadata_props.pop(key, None)
        program.save(tmp, external_data=False)

    return write_atomic(path, write)


def onnx_session(path: str | os.PathLike, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU ``InferenceSession`` on ``path`` (all graph optimisations; ``threads`` intra-op
    threads, default onnxruntime's). ``spin=False`` stops its idle worker threads spinning between runs
    (they then leave the cores to other work, at some latency). A file that is not an ONNX model raises
    ``InputError``: one onnxruntime cannot parse (empty, truncated, another format) or whose model it
    refuses at load (no graph, a graph that does not connect, an unknown operator)."""
    ort = _require("onnxruntime")
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, InvalidGraph, InvalidProtobuf

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except InvalidProtobuf:
        raise InputError(f"{path} is not an ONNX file (onnxruntime cannot parse it)") from None
    except (InvalidArgument, InvalidGraph) as exc:  # parsed, but not a model onnxruntime can load
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = (reason.partition(" failed:")[2].strip() or reason).rstrip(".")  # onnxruntime's "Load model from <path> failed:"
        raise InputError(f"{path} is not a usable ONNX model ({reason}); give a file written by "
                         f"'m3vit export --onnx'") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model-level ``metadata_props`` of an ONNX file (``m3vit.config``, ``m3vit.task``, ...)."""
    return dict(onnx_session(path, threads=1).get_modelmeta().custom_metadata_map)


@torch.no_grad()
def check_onnx(model: MultiTaskModel, path: str | os.PathLike, images: Tensor, *, task: str | None = None) -> float:
    """Max abs difference between onnxruntime on the ONNX file and the PyTorch ``model`` on ``images``
    (ImageNet-normalised ``[B, 3, H, W]``) for ``task`` (default: the model's only task)."""
    task = _one_task(model, task)
    session = onnx_session(path)
    with eval_mode(model):
        expected = model(images.to(next(model.parameters()).device), tasks=[task])[task].float().cpu()
    (got,) = session.run(None, {session.get_inputs()[0].name: images.float().cpu().numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())


# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------


def _float_nodes(proto, experts: bool = False) -> list[str]:
    """Nodes ``quantize_onnx`` keeps in float: those an ``ExportRouter`` emitted (found by their name scope,
    which records the module class), so the experts a token picks are decided as in the float model, and
    every ``MatMul`` of two activations (attention scores and their product with the values: int8 there
    costs accuracy and, through a quantised softmax between them, time); with ``experts`` also every
    ``MatMul`` of a ``SparseExportMoE`` (the experts' GEMMs)."""
    weights = {init.name for init in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        matmul = node.op_type == "MatMul"
        if (ExportRouter.__qualname__ in scope or (matmul and node.input[1] not in weights)
                or (experts and matmul and SparseExportMoE.__qualname__ in scope)):
            out.append(node.name)
    return out


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader``: the calibration images, ``batch_size`` at a time."""

    def __init__(self, images: Tensor, batch_size: int):
        self.batches = [images[i:i + batch_size].float().cpu().numpy() for i in range(0, len(images), batch_size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quantize_onnx(source: str | os.PathLike, out: str | os.PathLike, *, method: str = "static",
                  calibration: Tensor | None = None, batch_size: int = 4, float_experts: bool = False) -> Path:
    """Write an int8 version of the ONNX file ``source`` to ``out`` (atomically) with onnxruntime's quantiser.

    ``method``:

    * ``"static"``: QDQ; the weights of every ``Conv`` and weight ``MatMul`` int8 (per output channel),
      their input activations uint8 with ranges measured (MinMax) on ``calibration`` (ImageNet-normalised
      images ``[N, 3, H, W]``, run ``batch_size`` at a time);
    * ``"dynamic"``: weight ``MatMul`` only (int8 weights per channel, activations quantised per tensor at
      run time, no calibration); convolutions stay float (onnxruntime's dynamic ``ConvInteger`` ran 2x
      slower than float convolutions on an AVX2 CPU).

    The MoE routing (gate, softmax, top-k) and the attention's activation x activation products stay in
    float (``_float_nodes``); ``float_experts`` also keeps the experts' GEMMs in float (at ``m3vit_small``
    512x512 that measured the same speed-up as quantising them: ``benchmarks/onnx_latency.py
    --float-experts``). The source's metadata is copied.
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"method={method!r} is not a quantisation method; choose one of {list(QUANTIZATION_METHODS)}")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise ValueError("static quantisation needs calibration images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    onnx = _require("onnx")
    _require("onnxruntime")
    from onnxruntime import quantization as q

    proto = onnx.load(str(source))
    keep_float = _float_nodes(proto, experts=float_experts)

    def write(tmp: str) -> None:
        # The quantiser advises (root logger) to pre-process first: shape inference and fusions. The exporter
        # has already folded constants and batch norms, and pre-processing drops the name scopes that
        # ``_float_nodes`` reads, so the advice is left out.
        advice = _DropMessages("pre-process")
        logging.getLogger().addFilter(advice)
        try:
            if method == "static":
                q.quantize_static(proto, tmp, _CalibrationReader(calibration, batch_size),
                                  quant_format=q.QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul"],
                                  per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=keep_float)
            else:
                q.quantize_dynamic(proto, tmp, op_types_to_quantize=["MatMul"], per_channel=True,
                                   weight_type=q.QuantType.QInt8, nodes_to_exclude=keep_float)
        finally:
            logging.getLogger().removeFilter(advice)
        quantized = onnx.load(tmp)
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(proto.metadata_props)
        onnx.save(quantized, tmp)

    return write_atomic(out, write)
