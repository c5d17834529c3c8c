"""The accelerator's workload: a model config as an ordered list of layers with MACs and parameters.

One image, one task's pathway (batch 1), in execution order: the patch embedding, then per block the
attention stage (LayerNorm, QKV, QK^T, softmax, AV, projection) and the MLP stage (a dense MLP, or an
MoE: router + routed experts), then optionally the task's SETR-PUP decoder (one layer per convolution).
MACs count multiply-accumulates of matmuls and convolutions only, exactly what ``m3vit.count_flops``
counts (its FLOPs are 2 x MACs); for an MoE layer the expert MACs are ``tokens x k x`` an expert's
MACs per token (every token visits k experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..models.config import ModelConfig
from ..utils.errors import InputError

__all__ = ["Layer", "Workload", "build_workload", "dense_twin"]


@dataclass(frozen=True)
class Layer:
    """One stage of the dataflow.

    ``params``: parameters that must be on chip to run the stage (for an MoE layer: its LayerNorm
    and the current task's router; experts are counted separately in ``expert_params``).
    ``stream_values``: activation values read from / written to DRAM while the stage runs (image and
    positional embedding for the patch embedding, feature maps for the decoder).
    """

    name: str
    kind: str  # "patch_embed" | "attention" | "mlp" | "moe" | "head"
    macs: int
    params: int
    block: int | None = None
    stream_values: int = 0
    # MoE only
    tokens: int = 0
    num_experts: int = 0
    top_k: int = 0
    expert_params: int = 0
    expert_macs_per_token: int = 0
    router_macs: int = 0
    router_params: int = 0


@dataclass(frozen=True)
class Workload:
    """The layers of one single-task forward of ``config`` at ``config.img_size``."""

    config: ModelConfig
    task: str
    tokens: int
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    @property
    def moe_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "moe"]

    def macs_by_component(self) -> dict[str, int]:
        """MACs split as ``m3vit.count_flops`` splits FLOPs (``patch_embed``, ``attention``,
        ``dense_mlp``, ``router``, ``experts``, ``decoder``)."""
        parts = dict.fromkeys(("patch_embed", "attention", "dense_mlp", "router", "experts", "decoder"), 0)
        for layer in self.layers:
            if layer.kind == "moe":
                parts["router"] += layer.router_macs
                parts["experts"] += layer.macs - layer.router_macs
            else:
                key = {"mlp": "dense_mlp", "head": "decoder"}.get(layer.kind, layer.kind)
                parts[key] += layer.macs
        return parts

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The same backbone with dense MLPs everywhere (the paper's "FPGA dense ViT-S")."""
    return dataclasses.replace(cfg, moe_blocks=()).validate()


def _router_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters of one task's router that must be on chip, MACs per token of the router)."""
    dim, experts = cfg.embed_dim, cfg.num_experts
    if cfg.router == "task_conditioned":
        # the task half of the gate folds into a per-task logit offset: only the token half and
        # one offset vector are needed at inference
        return dim * experts + experts, dim * experts
    return dim * experts, dim * experts  # multi_gate (this task's gate) or shared: bias-free D x E


def build_workload(cfg: ModelConfig, task: str | None = None, include_heads: bool = False) -> Workload:
    """The layers of a single-task forward of ``cfg`` at ``cfg.img_size``; ``task`` picks the head
    (default: the config's first task); ``include_heads`` appends that task's decoder convolutions."""
    cfg.validate()
    if task is None:
        task = next(iter(cfg.tasks), "")
    elif task not in cfg.tasks:
        raise InputError(f"task {task!r} is not one of the model's tasks {list(cfg.tasks)}")
    dim, heads, patch = cfg.embed_dim, cfg.num_heads, cfg.patch_size
    grid = (cfg.img_size[0] // patch, cfg.img_size[1] // patch)
    patches = grid[0] * grid[1]
    tokens = patches + 1  # + cls token
    kernel = cfg.in_chans * patch * patch
    layers = [Layer("patch_embed", "patch_embed", macs=patches * dim * kernel, params=dim * kernel + dim,
                    stream_values=cfg.in_chans * cfg.img_size[0] * cfg.img_size[1] + tokens * dim + dim)]
    for b in range(cfg.depth):
        attn_macs = (tokens * dim * 3 * dim          # QKV projection
                     + 2 * tokens * tokens * dim     # QK^T and AV over all heads
                     + tokens * dim * dim)           # output projection
        attn_params = 3 * dim * dim + 3 * dim * int(cfg.qkv_bias) + dim * dim + dim + 2 * dim  # + LayerNorm 1
        layers.append(Layer(f"block{b}.attn", "attention", macs=attn_macs, params=attn_params, block=b))
        if b in cfg.moe_blocks:
            hidden = cfg.expert_hidden
            router_params, router_per_token = _router_params(cfg)
            expert_macs = 2 * dim * hidden
            layers.append(Layer(
                f"block{b}.moe", "moe", macs=tokens * router_per_token + tokens * cfg.top_k * expert_macs,
                params=router_params + 2 * dim, block=b, tokens=tokens, num_experts=cfg.num_experts, top_k=cfg.top_k,
                expert_params=2 * dim * hidden + hidden + dim, expert_macs_per_token=expert_macs,
                router_macs=tokens * router_per_token, router_params=router_params))
        else:
            hidden = cfg.mlp_hidden
            layers.append(Layer(f"block{b}.mlp", "mlp", macs=2 * tokens * dim * hidden,
                                params=2 * dim * hidden + hidden + dim + 2 * dim, block=b))
    if include_heads and task:
        layers.extend(_head_layers(cfg, task, grid))
    return Workload(config=cfg, task=task, tokens=tokens, layers=tuple(layers))


def _head_layers(cfg: ModelConfig, task: str, grid: tuple[int, int]) -> list[Layer]:
    """SETR-PUP: ``stages`` x (conv3x3 + BN + ReLU, x2 upsampling), the 1x1 classifier before the last
    upsampling (as ``m3vit.nn.SETRPUPHead`` and the reference head run it).

    Feature maps do not fit on chip (256 channels at 256x256 is 32 MiB), so every stage reads its input
    map from DRAM (the first reads the on-chip tokens) and writes its upsampled output back; the last
    stage writes its map un-upsampled, the classifier reads it and writes the upsampled prediction.
    """
    channels, out = cfg.head_channels, cfg.tasks[task]
    h, w = grid
    layers, in_ch = [], cfg.embed_dim
    for i in range(cfg.head_stages):
        read = 0 if i == 0 else in_ch * h * w
        scale = 1 if i == cfg.head_stages - 1 else 2
        layers.append(Layer(f"head.{task}.stage{i}", "head", macs=h * w * in_ch * channels * 9,
                            params=9 * in_ch * channels + 2 * channels,  # conv (no bias) + BatchNorm
                            stream_values=read + channels * (scale * h) * (scale * w)))
        if scale == 2:
            in_ch, h, w = channels, 2 * h, 2 * w
        else:
            in_ch = channels
    layers.append(Layer(f"head.{task}.classifier", "head", macs=h * w * in_ch * out, params=in_ch * out + out,
                        stream_values=in_ch * h * w + out * (2 * h) * (2 * w)))
    return layers
