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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..nn.dispatch import STRATEGIES
from ..nn.moe import BALANCE_LOSSES, MOE_INITS
from ..nn.routers import ROUTERS
from ..utils.errors import ConfigError, M3ViTError

__all__ = ["ModelConfig", "ConfigError", "GATE_SOFTMAX", "TASK_EMBED_SCOPES", "POS_EMBED_RESIZE",
           "PRETRAINED_EXPERTS", "REFERENCE_OPTIONS", "MAX_INPUT_SIDE", "MAX_INPUT_TOKENS", "MAX_RATIO",
           "check_input_size", "parse_number"]

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

# Sanity bounds, far above any real model, that keep a damaged config from describing an absurd one
# (every tensor's byte count then fits in 64 bits, and building the model stays quick).
MAX_WIDTH = 65536  # embed_dim, head_channels, task_embed_dim, in_chans, num_experts, task channels, num_heads
MAX_HIDDEN = 262144  # an MLP's or expert's hidden units
MAX_DEPTH = 1024  # transformer blocks
_INT_LIMITS = {"patch_size": 1024, "in_chans": MAX_WIDTH, "embed_dim": MAX_WIDTH, "depth": MAX_DEPTH,
               "num_heads": MAX_WIDTH, "num_experts": MAX_WIDTH, "top_k": MAX_WIDTH, "task_embed_dim": MAX_WIDTH,
               "head_channels": MAX_WIDTH, "head_stages": 16}

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
        """Check every field's type and range (normalising ``img_size``, ``moe_blocks``, ``tasks``); returns self.

        Sizes are bounded (``MAX_WIDTH``, ``MAX_DEPTH``, ...) far above any real model, so that a damaged
        config (a checkpoint's ``config.yaml`` with ``embed_dim: 300000``) fails here, with its key named.
        """
        self.moe_blocks = _int_tuple("moe_blocks", self.moe_blocks)
        if not isinstance(self.tasks, Mapping):
            raise ConfigError(f"tasks must map task names to output channels, got {self.tasks!r:.80}")
        self.tasks = {str(t): c for t, c in self.tasks.items()}
        for task, channels in self.tasks.items():
            if not _is_int(channels) or not 1 <= channels <= MAX_WIDTH:
                raise ConfigError(f"task {task!r} needs an integer number of output channels in [1, {MAX_WIDTH}], "
                                  f"got {channels!r}")
        self.tasks = {t: int(c) for t, c in self.tasks.items()}
        for key, top in _INT_LIMITS.items():
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
            if value > top:
                raise ConfigError(f"{key} must be at most {top}, got {value!r}")
            setattr(self, key, int(value))
        for key in ("name", "router", "dispatch", "gate_softmax"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r:.80}")
        for key in ("qkv_bias", "renormalize"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r:.80}")
        for key in ("mlp_ratio", "expert_ratio", "drop_path_rate", "noise_std", "capacity_factor"):
            value = getattr(self, key)
            if key == "capacity_factor" and value is None:
                continue
            number = parse_number(value)  # YAML 1.1 reads 1e-3 as a string: numeric strings are numbers
            if number is None or not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r:.80}")
            setattr(self, key, number)
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
            if not 0 < getattr(self, key) <= MAX_RATIO:
                raise ConfigError(f"{key} must be in (0, {MAX_RATIO:g}], got {getattr(self, key)!r}")
        for key, hidden in (("mlp_ratio", round(self.mlp_ratio * self.embed_dim)),
                            ("expert_ratio", round(self.expert_ratio * self.embed_dim))):
            if hidden > MAX_HIDDEN:
                raise ConfigError(f"{key}={getattr(self, key)!r} makes a hidden layer of {hidden} units for "
                                  f"embed_dim={self.embed_dim}; at most {MAX_HIDDEN}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if not self.noise_std >= 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 or null (dropless), got {self.capacity_factor!r}")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        if bad or len(set(self.moe_blocks)) != len(self.moe_blocks):
            raise ConfigError(f"moe_blocks={list(self.moe_blocks)} must be distinct block indices in [0, {self.depth})")
        self.img_size = check_input_size(self.img_size, self.patch_size, "img_size")
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
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"expert_subsets: {block!r}: {ids!r:.80} must be a block index and a list of "
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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_tuple(key: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(f"{key} must be a list of integers, got {value!r:.80}")
    items = tuple(value)
    if not all(_is_int(v) for v in items):
        raise ConfigError(f"{key} must be a list of integers, got {list(items)!r:.80}")
    return tuple(int(v) for v in items)
