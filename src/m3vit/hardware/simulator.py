"""An analytic, cycle-level model of the M³ViT FPGA dataflow: latency, DRAM traffic, on-chip memory, energy.

The accelerator (one MAC array, two ping-pong weight buffers, on-chip token buffers, DRAM behind it):

* **Stages.** A forward is a sequence of stages (``workload.Layer``): patch embedding, then per block
  attention and MLP/MoE, then optionally the task's decoder. A stage computes at the array's sustained
  rate ``platform.macs_per_cycle``; non-linear units (softmax, GELU, LayerNorm) are pipelined behind the
  array and add no cycles.
* **Weight prefetch.** Weights whose identity is known before a stage starts (everything but routed
  experts) are loaded into weight buffer ``s mod 2`` while stage ``s-1`` computes from the other one;
  the load only uses DRAM time the previous stage leaves idle, and whatever does not fit is exposed as
  a stall. The first stage's weights are always exposed.
* **Activations.** The token matrix stays on chip (``token_buffers x N x D``) plus one head's K and V
  (``2 x N x D/H``) for attention, so the backbone moves no activations through DRAM except the input
  image and positional embedding (streamed during the patch embedding) and the final tokens (written
  back). Decoder feature maps do not fit and are streamed, overlapped with their convolution.
* **On-chip requirement** = the two weight buffers (each sized for the largest stage it serves) + the
  token buffers + the K/V scratch; ``fits_on_chip`` compares it with the platform's BRAM + URAM.

The four designs differ only in the MLP stage of MoE blocks (cycles below are float; ``L`` = one
expert's load time at sustained DRAM bandwidth, ``c`` = one token's expert compute):

* ``dense`` - the same backbone with dense MLPs (``mlp_ratio``) in every block; weights prefetched.
* ``moe_no_reorder`` - token by token: each token needs its k experts; a weight cache of ``C`` experts
  (LRU, default ``C = k``: the least that holds one token's experts) serves them. The token's cached
  experts are used first, then every miss loads an expert (``L``) and computes with it; the load of
  a token's weights cannot overlap its compute, so the layer costs ``sum_t (misses_t L + k c)``.
* ``moe_reorder`` - computation reordering: every token is routed first, then the experts with
  non-empty queues run in index order, each once over its whole queue, while the next expert loads
  into the other half of a double buffer: ``L + sum_i max(q_i c, L) + q_last c`` (the first load is
  exposed: the first busy expert is only known after routing). Two experts on chip, whatever ``E``.
* ``moe_all_on_chip`` - every expert of the layer resident: all ``E`` experts are prefetched like any
  static weight (overlapping the attention stage), then the queues run back to back.

Energy = board power x latency (the board draws its power whether the array computes or waits).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..models.config import ModelConfig
from ..utils.errors import ConfigError, InputError
from .routing import Routing, synthetic_routing
from .spec import Platform
from .workload import Layer, Workload, build_workload, dense_twin

__all__ = [
    "DESIGNS", "LayerResult", "DesignResult", "SimulationResult", "simulate", "sweep_experts",
    "lru_expert_misses", "reorder_pipeline_cycles",
]


DESIGNS = ("dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip")
MIB = 2**20


# ------------------------------------------------------------------------------------------------
# Primitives of the two streaming schedules
# ------------------------------------------------------------------------------------------------
def lru_expert_misses(indices: np.ndarray, cache_size: int) -> np.ndarray:
    """Expert loads per token of the token-by-token schedule with an LRU cache of ``cache_size`` experts.

    Tokens are processed in order; a token first uses the experts it needs that are cached (they
    become most recent), then loads each missing one, evicting the least recently used expert. Every
    loaded expert is used at once, so no expert the token still needs is ever evicted.
    """
    if cache_size < 1:
        raise ConfigError(f"the expert cache must hold >= 1 expert, got {cache_size}")
    cache: OrderedDict[int, None] = OrderedDict()
    misses = np.zeros(len(indices), dtype=np.int64)
    for t, choices in enumerate(np.asarray(indices)):
        needed = list(dict.fromkeys(int(e) for e in choices))
        for e in needed:
            if e in cache:
                cache.move_to_end(e)
        for e in needed:
            if e in cache:
                continue
            misses[t] += 1
            if len(cache) >= cache_size:
                cache.popitem(last=False)
            cache[e] = None
    return misses


def reorder_pipeline_cycles(queue_lengths: Sequence[int], load_cycles: float,
                            cycles_per_token: float) -> tuple[float, int]:
    """Cycles of the reordered, double-buffered expert loop and the number of experts loaded.

    Experts with an empty queue are skipped (never loaded). ``L + sum_{i<n} max(C_i, L) + C_n`` with
    ``C_i = q_i * cycles_per_token``: it is >= the compute bound ``sum C_i`` and the load bound ``n L``.
    """
    busy = [int(q) for q in queue_lengths if q > 0]
    if not busy:
        return 0.0, 0
    compute = [q * cycles_per_token for q in busy]
    total = load_cycles + sum(max(c, load_cycles) for c in compute[:-1]) + compute[-1]
    return total, len(busy)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerResult:
    """One stage of one design. ``stall_cycles``: exposed weight prefetch; ``cycles`` = stall + body."""

    name: str
    kind: str
    macs: int
    compute_cycles: float
    stall_cycles: float
    cycles: float
    dram_bytes: float
    weight_buffer_bytes: float
    expert_loads: int | None = None

    def to_dict(self, clock_hz: float) -> dict:
        out = {"name": self.name, "kind": self.kind, "macs": self.macs,
               "compute_cycles": round(self.compute_cycles), "stall_cycles": round(self.stall_cycles),
               "cycles": round(self.cycles), "latency_ms": self.cycles / clock_hz * 1e3,
               "dram_mib": self.dram_bytes / MIB, "weight_buffer_mib": self.weight_buffer_bytes / MIB}
        if self.expert_loads is not None:
            out["expert_loads"] = self.expert_loads
        return out


@dataclass
class DesignResult:
    """Totals of one design: cycles, latency, DRAM traffic, on-chip requirement, energy."""

    design: str
    cycles: float
    latency_ms: float
    dram_bytes: float
    onchip_bytes: float
    energy_j: float
    fits_on_chip: bool
    onchip_parts: dict[str, float]
    layers: list[LayerResult]

    @property
    def onchip_mib(self) -> float:
        return self.onchip_bytes / MIB

    @property
    def compute_cycles(self) -> float:
        return sum(layer.compute_cycles for layer in self.layers)

    def to_dict(self, clock_hz: float, layers: bool = True) -> dict:
        out = {"latency_ms": self.latency_ms, "onchip_mib": self.onchip_mib, "energy_j": self.energy_j,
               "dram_mib": self.dram_bytes / MIB, "cycles": round(self.cycles),
               "fits_on_chip": self.fits_on_chip,
               "onchip_parts_mib": {k: v / MIB for k, v in self.onchip_parts.items()}}
        if layers:
            out["layers"] = [layer.to_dict(clock_hz) for layer in self.layers]
        return out


@dataclass
class SimulationResult:
    """All simulated designs of one workload on one platform."""

    platform: Platform
    workload: Workload
    routing_source: str
    cache_experts: int | None
    designs: dict[str, DesignResult]
    task_switch: dict[str, float]
    expert_sweep: list[dict] = field(default_factory=list)

    def to_dict(self, layers: bool = True) -> dict:
        cfg = self.workload.config
        clock = self.platform.clock_hz
        return {
            "platform": {**self.platform.to_dict(), "macs_per_cycle": self.platform.macs_per_cycle,
                         "dram_bytes_per_cycle": self.platform.dram_bytes_per_cycle,
                         "onchip_capacity_mib": self.platform.onchip_capacity_bytes / MIB},
            "model": {"name": cfg.name, "img_size": list(cfg.img_size), "task": self.workload.task,
                      "tokens": self.workload.tokens, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
                      "moe_blocks": list(cfg.moe_blocks), "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                      "expert_hidden": cfg.expert_hidden, "gmacs": self.workload.macs / 1e9,
                      "includes_heads": any(l.kind == "head" for l in self.workload.layers)},
            "routing": self.routing_source,
            "cache_experts": self.cache_experts,
            "designs": {name: d.to_dict(clock, layers) for name, d in self.designs.items()},
            "task_switch": self.task_switch,
            "expert_sweep": self.expert_sweep,
        }


# ------------------------------------------------------------------------------------------------
# The simulation
# ------------------------------------------------------------------------------------------------
@dataclass
class _Stage:
    layer: Layer
    compute_cycles: float
    body_cycles: float          # cycles once the stage's prefetched weights are on chip
    body_dram_busy: float       # DRAM cycles used during the body (expert loads, streamed activations)
    prefetch_bytes: float
    body_bytes: float
    weight_buffer_bytes: float
    expert_loads: int | None = None


def _static_stage(layer: Layer, p: Platform) -> _Stage:
    compute = layer.macs / p.macs_per_cycle
    stream_bytes = layer.stream_values * p.activation_bytes
    stream = stream_bytes / p.dram_bytes_per_cycle
    weights = layer.params * p.weight_bytes
    return _Stage(layer, compute, max(compute, stream), stream, weights, stream_bytes, weights)


def _moe_stage(layer: Layer, design: str, routing: np.ndarray, p: Platform, cache_experts: int) -> _Stage:
    experts, k = layer.num_experts, layer.top_k
    if routing.shape[1] != k or (routing.size and (routing.min() < 0 or routing.max() >= experts)):
        raise InputError(f"{layer.name}: routing must be [tokens, {k}] expert ids in [0, {experts}), "
                         f"got shape {list(routing.shape)}")
    if routing.shape[0] != layer.tokens:
        raise InputError(f"{layer.name}: routing covers {routing.shape[0]} tokens, the layer has {layer.tokens}")
    expert_bytes = layer.expert_params * p.weight_bytes
    load = expert_bytes / p.dram_bytes_per_cycle
    per_token = layer.expert_macs_per_token / p.macs_per_cycle
    router = layer.router_macs / p.macs_per_cycle
    expert_compute = routing.size * per_token
    static = layer.params * p.weight_bytes  # router + LayerNorm
    if design == "moe_reorder":
        queues = np.bincount(routing.reshape(-1), minlength=experts)
        pipeline, loads = reorder_pipeline_cycles(queues, load, per_token)
        slots = min(2, experts)
        return _Stage(layer, router + expert_compute, router + pipeline, loads * load, static,
                      loads * expert_bytes, static + slots * expert_bytes, loads)
    if design == "moe_no_reorder":
        misses = int(lru_expert_misses(routing, cache_experts).sum())
        return _Stage(layer, router + expert_compute, router + misses * load + expert_compute, misses * load,
                      static, misses * expert_bytes, static + min(cache_experts, experts) * expert_bytes, misses)
    if design == "moe_all_on_chip":
        resident = experts * expert_bytes
        return _Stage(layer, router + expert_compute, router + expert_compute, 0.0, static + resident, 0.0,
                      static + resident, experts)
    raise ValueError(f"unknown MoE design {design!r}; choose one of {list(DESIGNS[1:])}")


def _run_design(design: str, workload: Workload, routing: Routing | None, p: Platform,
                cache_experts: int) -> DesignResult:
    cfg = workload.config
    stages: list[_Stage] = []
    moe_index = 0
    for layer in workload.layers:
        if layer.kind == "moe":
            stages.append(_moe_stage(layer, design, routing.indices[moe_index], p, cache_experts))
            moe_index += 1
        else:
            stages.append(_static_stage(layer, p))
    if not any(s.layer.kind == "head" for s in stages):
        # the backbone's output tokens go back to DRAM for whatever consumes them
        out = Layer("write_tokens", "output", macs=0, params=0, stream_values=workload.tokens * cfg.embed_dim)
        stages.append(_static_stage(out, p))

    results, buffers = [], [0.0, 0.0]
    prev_idle = 0.0
    for s, stage in enumerate(stages):
        prefetch = stage.prefetch_bytes / p.dram_bytes_per_cycle
        stall = max(0.0, prefetch - prev_idle)
        cycles = stall + stage.body_cycles
        prev_idle = stage.body_cycles - stage.body_dram_busy
        buffers[s % 2] = max(buffers[s % 2], stage.weight_buffer_bytes)
        results.append(LayerResult(stage.layer.name, stage.layer.kind, stage.layer.macs, stage.compute_cycles,
                                   stall, cycles, stage.prefetch_bytes + stage.body_bytes,
                                   stage.weight_buffer_bytes, stage.expert_loads))
    tokens = workload.tokens
    parts = {
        "weight_buffers": buffers[0] + buffers[1],
        "token_buffers": p.token_buffers * tokens * cfg.embed_dim * p.activation_bytes,
        "kv_scratch": 2 * tokens * (cfg.embed_dim // cfg.num_heads) * p.activation_bytes,
    }
    onchip = sum(parts.values())
    cycles = sum(r.cycles for r in results)
    latency_s = cycles / p.clock_hz
    return DesignResult(design, cycles, latency_s * 1e3, sum(r.dram_bytes for r in results), onchip,
                        p.board_power_w * latency_s, onchip <= p.onchip_capacity_bytes, parts, results)


def simulate(cfg: ModelConfig, platform: Platform, *, task: str | None = None, routing: Routing | None = None,
             designs: Sequence[str] = DESIGNS, include_heads: bool = False, cache_experts: int | None = None,
             seed: int = 0, routing_alpha: float | None = None) -> SimulationResult:
    """Simulate ``designs`` for one single-task forward of ``cfg`` (at ``cfg.img_size``) on ``platform``.

    ``routing``: the experts each token visits per MoE layer (``trace_routing``); default synthetic
    (``synthetic_routing(seed=seed, alpha=routing_alpha)``). ``cache_experts``: the token-by-token
    design's LRU capacity (default ``top_k``). ``dense`` runs ``dense_twin(cfg)``. A model without MoE
    blocks can only be simulated as ``dense``.
    """
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not designs:
        raise ConfigError(f"unknown design(s) {unknown or list(designs)}; choose from {list(DESIGNS)}")
    workload = build_workload(cfg, task, include_heads)
    moe = workload.moe_layers
    if not moe and any(d != "dense" for d in designs):
        raise ConfigError(f"model {cfg.name!r} has no MoE block; only the 'dense' design applies "
                         "(choose an m3vit_* model or set moe_blocks)")
    cache = cfg.top_k if cache_experts is None else int(cache_experts)
    if cache < 1:
        raise ConfigError(f"the expert cache must hold >= 1 expert, got {cache}")
    if routing is None and moe:
        routing = synthetic_routing(len(moe), workload.tokens, cfg.num_experts, cfg.top_k, seed, routing_alpha)
    if moe and len(routing.indices) != len(moe):
        raise InputError(f"routing has {len(routing.indices)} MoE layers, the model has {len(moe)}")
    results = {}
    for design in designs:
        if design == "dense":
            results[design] = _run_design(design, build_workload(dense_twin(cfg), workload.task, include_heads),
                                          None, platform, cache)
        else:
            results[design] = _run_design(design, workload, routing, platform, cache)
    return SimulationResult(platform, workload, routing.source if moe else "none (dense model)",
                            cache if moe else None, results, _task_switch(workload, platform))


def _task_switch(workload: Workload, p: Platform) -> dict[str, float]:
    """What changes on chip when the next image runs another task: the routers (and the task's head).

    The reordered design streams experts for every image anyway, so switching tasks reloads only the
    new task's router of each MoE layer (and its decoder, when heads are simulated). For contrast:
    the bytes of every expert of every MoE layer, what a design that kept one task's experts resident
    across images would have to reload."""
    router = sum(l.router_params for l in workload.moe_layers) * p.weight_bytes
    head = sum(l.params for l in workload.layers if l.kind == "head") * p.weight_bytes
    experts = sum(l.num_experts * l.expert_params for l in workload.moe_layers) * p.weight_bytes
    cycles = (router + head) / p.dram_bytes_per_cycle
    return {"router_bytes": router, "head_bytes": head, "bytes": router + head, "cycles": cycles,
            "us": cycles / p.clock_hz * 1e6, "all_experts_bytes": experts,
            "all_experts_us": experts / p.dram_bytes_per_cycle / p.clock_hz * 1e6}


def sweep_experts(cfg: ModelConfig, platform: Platform, experts: Sequence[int], *, task: str | None = None,
                  designs: Sequence[str] = DESIGNS, include_heads: bool = False, cache_experts: int | None = None,
                  seed: int = 0, routing_alpha: float | None = None) -> list[dict]:
    """On-chip memory, latency and DRAM traffic per design as the number of experts grows (synthetic
    routing, same seed; ``top_k`` and the expert width stay as in ``cfg``)."""
    rows = []
    for num in experts:
        sim = simulate(cfg.replace(num_experts=int(num)), platform, task=task, designs=designs,
                       include_heads=include_heads, cache_experts=cache_experts, seed=seed,
                       routing_alpha=routing_alpha)
        rows.append({"experts": int(num), "designs": {
            name: {"onchip_mib": d.onchip_mib, "latency_ms": d.latency_ms, "dram_mib": d.dram_bytes / MIB,
                   "energy_j": d.energy_j} for name, d in sim.designs.items()}})
    return rows
