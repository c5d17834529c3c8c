"""A parametric model of the M³ViT FPGA accelerator: platforms as data, the model's layers, expert
routing (traced or synthetic), and the dense / token-by-token / reordered / all-on-chip dataflows.

Read ``spec.py`` (platform parameters and why they have their values), ``workload.py`` (layers and
MACs), ``simulator.py`` (the dataflow model); ``routing.py`` supplies which experts each token visits.
"""

from .routing import Routing, synthetic_routing, trace_routing
from .simulator import (DESIGNS, DesignResult, LayerResult, SimulationResult, lru_expert_misses,
                        reorder_pipeline_cycles, simulate, sweep_experts)
from .spec import Platform, PlatformError, list_platforms, load_platform
from .workload import Layer, Workload, build_workload, dense_twin

__all__ = [
    "DESIGNS", "DesignResult", "Layer", "LayerResult", "Platform", "PlatformError", "Routing",
    "SimulationResult", "Workload", "build_workload", "dense_twin", "list_platforms", "load_platform",
    "lru_expert_misses", "reorder_pipeline_cycles", "simulate", "sweep_experts", "synthetic_routing",
    "trace_routing",
]
