"""Efficiency tools: FLOPs of what executes, latency, per-task extraction and export (checkpoint, ONNX, int8),
expert streaming, fixed-point emulation."""

from .flops import COMPONENTS, FlopReport, count_flops
from .latency import measure_latency
from .export import ExtractionReport, export_checkpoint, extract_task
from .onnx_export import export_onnx, quantize_onnx
from .onnx_model import OnnxModel, evaluate_onnx
from .streaming import ExpertStreamer, StreamingMoE, StreamStats, load_streaming_model
from .fixed_point import FixedPoint, FixedPointModel, quantize_model

__all__ = ["COMPONENTS", "FlopReport", "count_flops", "measure_latency",
           "extract_task", "export_checkpoint", "export_onnx", "quantize_onnx", "OnnxModel", "evaluate_onnx",
           "ExtractionReport",
           "load_streaming_model", "StreamingMoE", "ExpertStreamer", "StreamStats",
           "FixedPoint", "FixedPointModel", "quantize_model"]
