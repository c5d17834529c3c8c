"""Typed, validated configuration of a multi-task (MoE) ViT: everything needed to rebuild a model.

Also the one rule for network input sizes (``check_input_size``), used by ``img_size``, ``data.size``,
``m3vit infer --size``, ``m3vit flops --img-size`` and ``m3vit hw --img-size``: each side a positive
multiple of the patch size, at most ``MAX_INPUT_SIDE`` pixels, and at most ``MAX_INPUT_TOKENS`` patch
tokens in all.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..nn.dispatch import STRATEGIES
from ..nn.routers import ROUTERS
from ..utils.errors import ConfigError, M3ViTError

__all__ = ["ModelConfig", "ConfigError", "GATE_SOFTMAX", "MAX_INPUT_SIDE", "MAX_INPUT_TOKENS", "MAX_RATIO",
           "check_input_size", "parse_number"]

GATE_SOFTMAX = ("all", "kept")

#: Largest side, in pixels, of a network input (``img_size``, ``data.size``, ``--size``, ``--img-size``).
MAX_INPUT_SIDE = 4096
#: Most patch tokens of a network input, ``(H / patch) * (W / patch)``. Attention costs grow with its
#: square and every decoder holds ``head_channels x H x W`` floats, so 16384 (2048x2048 at patch 16,
#: ~4 GB of decoder activations per task for ViT-S) is already far past the paper's 512x512 (1024 tokens)
#: and 480x640 (1200 tokens).
MAX_INPUT_TOKENS = 16384
#: Largest ``mlp_ratio`` / ``expert_ratio`` (hidden width / embed_dim); larger only exhausts memory.
MAX_RATIO = 64.0


def parse_number(value: Any) -> float | None:
    """A config value as a float: an int, a float or a numeric string (YAML 1.1 reads ``1e-3`` as a
    string); None for anything else, booleans included. NaN and inf come back as they are."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            return math.inf if value > 0 else -math.inf
    return None


def check_input_size(size: Any, patch_size: int, key: str = "img_size",
                     error: type[M3ViTError] = ConfigError) -> tuple[int, int]:
    """``size`` (an int or a pair H, W) as a validated ``(H, W)`` network input size, or ``error`` naming ``key``.

    Each side must be a positive multiple of ``patch_size`` and at most ``MAX_INPUT_SIDE``; the patch
    tokens ``(H / patch) * (W / patch)`` must not exceed ``MAX_INPUT_TOKENS``.
    """
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in size)):
        raise error(f"{key} must be (H, W), two positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise error(f"{key} {h}x{w} must be positive")
    if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
        raise error(f"{key} {h}x{w}: each side must be <= {MAX_INPUT_SIDE} pixels (m3vit's input-size limit)")
    if h % patch_size or w % patch_size:
        near = [max(patch_size, round(s / patch_size) * patch_size) for s in (h, w)]
        raise error(f"{key} {h}x{w} is not divisible by the patch size {patch_size}; use multiples of "
                    f"{patch_size}, e.g. {near[0]}x{near[1]}")
    tokens = (h // patch_size) * (w // patch_size)
    if tokens > MAX_INPUT_TOKENS:
        raise error(f"{key} {h}x{w} at patch size {patch_size} gives {tokens} patch tokens; at most "
                    f"{MAX_INPUT_TOKENS} are allowed (e.g. 2048x2048 at patch 16)")
    return h, w


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
        for key in ("mlp_ratio", "expert_ratio", "drop_path_rate", "noise_std", "capacity_factor"):
            value = getattr(self, key)
            if key == "capacity_factor" and value is None:
                continue
            number = parse_number(value)
            if number is None or not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            setattr(self, key, number)
        for key in ("mlp_ratio", "expert_ratio"):
            if not 0 < getattr(self, key) <= MAX_RATIO:
                raise ConfigError(f"{key} must be in (0, {MAX_RATIO:g}], got {getattr(self, key)!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 or null (dropless), got {self.capacity_factor!r}")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        if bad or len(set(self.moe_blocks)) != len(self.moe_blocks):
            raise ConfigError(f"moe_blocks={list(self.moe_blocks)} must be distinct block indices in [0, {self.depth})")
        self.img_size = check_input_size(self.img_size, self.patch_size, "img_size")
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

