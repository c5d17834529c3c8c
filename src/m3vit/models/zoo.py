"""The named model configurations (``m3vit_*``, ``mvit_*``) that ``create_model`` builds by name.

``m3vit_*``: MoE in every other block (1, 3, ...), 16 experts, top-4, expert hidden = width (a token's
active MLP compute equals the dense MLP's), multi-gate routing, and the official code's balance loss,
initialisation, shared task embedding and bilinear positional-embedding resize (``REFERENCE_OPTIONS``,
docs/reference.md). ``mvit_*``: the dense multi-task baseline (bilinear resize, the one option that applies
to it). ``*_micro`` is a CPU-scale config (width 96, 6 blocks) for demos and tests; it is not a paper
configuration.
"""

from __future__ import annotations

from .config import REFERENCE_OPTIONS, ModelConfig

__all__ = ["named_configs"]

#: Backbone sizes: width, depth, heads (and the micro config's smaller decoder).
_SIZES = {
    "micro": dict(embed_dim=96, depth=6, num_heads=3, head_channels=64),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def named_configs() -> dict[str, tuple[ModelConfig, str]]:
    """``{name: (config without tasks, one-line description)}`` of every named configuration."""
    zoo: dict[str, tuple[ModelConfig, str]] = {}
    for size, arch in _SIZES.items():
        moe = dict(arch, moe_blocks=tuple(range(1, arch["depth"], 2)), num_experts=16, top_k=4,
                   expert_ratio=1.0, router="multi_gate", **REFERENCE_OPTIONS)
        zoo[f"m3vit_{size}"] = (ModelConfig(name=f"m3vit_{size}", **moe),
                                f"M³ViT-{size}: MoE ViT, {arch['embed_dim']} wide, 16 experts top-4, multi-gate")
        zoo[f"mvit_{size}"] = (ModelConfig(name=f"mvit_{size}", pos_embed_resize="bilinear", **arch),
                               f"M-ViT-{size}: dense multi-task ViT baseline, {arch['embed_dim']} wide")
    return zoo
