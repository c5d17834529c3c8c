"""Typed, validated configuration of a multi-task (MoE) ViT: everything needed to rebuild a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from ..nn.dispatch import STRATEGIES
from ..nn.moe import BALANCE_LOSSES, MOE_INITS
from ..nn.routers import ROUTERS
from ..utils.errors import ConfigError

__all__ = ["ModelConfig", "ConfigError", "GATE_SOFTMAX", "TASK_EMBED_SCOPES", "POS_EMBED_RESIZE",
           "PRETRAINED_EXPERTS", "REFERENCE_OPTIONS"]

GATE_SOFTMAX = ("all", "kept")
#: Where a task-conditioned model keeps its task embedding: one per model (official) or one per MoE layer.
TASK_EMBED_SCOPES = ("model", "layer")
#: Interpolation of the positional-embedding grid (pretrained loading and run-time resizing).
POS_EMBED_RESIZE = ("bilinear", "bicubic")
#: How ``load_pretrained_vit`` fills the experts: copies of the dense MLP, or left at their init.
PRETRAINED_EXPERTS = ("upcycle", "init")
#: The official M³ViT's choices (docs/reference.md), set by the registered models; the field
#: defaults below keep m3vit's earlier behaviour so that an older config.yaml means what it meant.
REFERENCE_OPTIONS = {"balance_loss": "reference", "init": "reference", "task_embed": "model",
                     "pos_embed_resize": "bilinear"}


@dataclass
class ModelConfig:
    """Architecture of a ViT backbone (dense or MoE) with one SETR-PUP head per task.

    ``moe_blocks`` lists the block indices whose MLP is a mixture of experts (empty: dense M-ViT).
    Each expert has ``expert_hidden = round(expert_ratio * embed_dim)`` hidden units; with
    ``expert_ratio=1`` and ``top_k=4`` a token's active MLP compute equals a dense ``mlp_ratio=4`` MLP.

    ``expert_subsets`` (written by per-task extraction, ``m3vit export``) maps an MoE block to the
    ids of the ``num_experts`` experts it holds; other MoE blocks hold all of them. Such a block picks
    ``min(top_k, held)`` experts among the held ones. ``gate_softmax`` says over which experts its gate
    softmax runs: ``"all"`` keeps every expert's gate row so a held expert's combine weight is
    unchanged (exact extraction), ``"kept"`` keeps only the held experts' rows (the routing is
    renormalised over them).

    Options that follow the official M³ViT code (``docs/reference.md``; the registered ``m3vit_*``
    models set ``REFERENCE_OPTIONS``, ``mvit_*`` its ``pos_embed_resize``): ``balance_loss``
    (``reference`` | ``vmoe``), ``init`` of the experts and gates (``reference`` | ``trunc_normal``),
    ``task_embed`` (``model``: one task embedding for the model, ``layer``: one per MoE layer),
    ``pos_embed_resize`` (``bilinear`` | ``bicubic``) and ``pretrained_experts`` (``upcycle`` | ``init``).
    """

    name: str = "custom"
    tasks: dict[str, int] = field(default_factory=dict)
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    moe_blocks: tuple[int, ...] = ()
    num_experts: int = 16
    top_k: int = 4
    expert_ratio: float = 1.0
    router: str = "multi_gate"
    noise_std: float = 0.0
    task_embed_dim: int = 64
    renormalize: bool = False
    capacity_factor: float | None = None
    dispatch: str = "auto"
    head_channels: int = 256
    head_stages: int = 4
    expert_subsets: dict[int, list[int]] = field(default_factory=dict)
    gate_softmax: str = "all"
    balance_loss: str = "vmoe"
    init: str = "trunc_normal"
    task_embed: str = "layer"
    pos_embed_resize: str = "bicubic"
    pretrained_experts: str = "upcycle"

    @property
    def expert_hidden(self) -> int:
        return max(1, round(self.expert_ratio * self.embed_dim))

    @property
    def mlp_hidden(self) -> int:
        return max(1, round(self.mlp_ratio * self.embed_dim))

    @property
    def is_moe(self) -> bool:
        return len(self.moe_blocks) > 0

    def experts_in_block(self, block: int) -> int:
        """How many experts MoE block ``block`` holds (``num_experts`` unless it holds a subset)."""
        return len(self.expert_subsets[block]) if block in self.expert_subsets else self.num_experts

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, **overrides) -> "ModelConfig":
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; allowed: {self.keys()}")
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    def validate(self) -> "ModelConfig":
        self.img_size = _pair("img_size", self.img_size)
        self.moe_blocks = tuple(int(b) for b in self.moe_blocks)
        self.tasks = {str(t): int(c) for t, c in dict(self.tasks).items()}
        positive = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_experts", "top_k",
                    "task_embed_dim", "head_channels", "head_stages")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.dispatch not in STRATEGIES:
            raise ConfigError(f"dispatch={self.dispatch!r} is not allowed; choose one of {list(STRATEGIES)}")
        if self.router not in ROUTERS:
            raise ConfigError(f"router={self.router!r} is not allowed; choose one of {sorted(ROUTERS)}")
        for key, allowed in (("balance_loss", BALANCE_LOSSES), ("init", MOE_INITS), ("task_embed", TASK_EMBED_SCOPES),
                             ("pos_embed_resize", POS_EMBED_RESIZE), ("pretrained_experts", PRETRAINED_EXPERTS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        for key in ("mlp_ratio", "expert_ratio"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 or null (dropless), got {self.capacity_factor!r}")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        if bad or len(set(self.moe_blocks)) != len(self.moe_blocks):
            raise ConfigError(f"moe_blocks={list(self.moe_blocks)} must be distinct block indices in [0, {self.depth})")
        for dim, size in zip("HW", self.img_size):
            if size % self.patch_size:
                raise ConfigError(f"img_size {dim}={size} is not divisible by patch_size={self.patch_size}")
        for task, channels in self.tasks.items():
            if channels < 1:
                raise ConfigError(f"task {task!r} needs >= 1 output channel, got {channels}")
        self._validate_expert_subsets()
        return self

    def _validate_expert_subsets(self) -> None:
        if self.gate_softmax not in GATE_SOFTMAX:
            raise ConfigError(f"gate_softmax={self.gate_softmax!r} is not allowed; "
                              f"choose one of {list(GATE_SOFTMAX)}")
        if not isinstance(self.expert_subsets, dict):
            raise ConfigError(f"expert_subsets must map MoE block indices to lists of expert ids, "
                              f"got {self.expert_subsets!r}")
        subsets = {}
        for block, ids in self.expert_subsets.items():
            try:
                block, ids = int(block), [int(e) for e in ids]
            except (TypeError, ValueError):
                raise ConfigError(f"expert_subsets: {block!r}: {ids!r} must be a block index and a list of "
                                  f"expert ids") from None
            if block not in self.moe_blocks:
                raise ConfigError(f"expert_subsets: block {block} is not an MoE block "
                                  f"(moe_blocks={list(self.moe_blocks)})")
            if not ids or ids != sorted(set(ids)) or not 0 <= ids[0] <= ids[-1] < self.num_experts:
                raise ConfigError(f"expert_subsets: block {block} must list distinct increasing expert ids in "
                                  f"[0, {self.num_experts}), got {ids}")
            subsets[block] = ids
        self.expert_subsets = dict(sorted(subsets.items()))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["img_size"] = list(self.img_size)
        out["moe_blocks"] = list(self.moe_blocks)
        out["expert_subsets"] = {int(b): list(ids) for b, ids in self.expert_subsets.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; allowed: {cls.keys()}")
        return cls(**data).validate()


def _pair(key: str, value) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an int or a pair (H, W), got {value!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    return (h, w)
