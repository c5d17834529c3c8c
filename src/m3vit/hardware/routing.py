"""Which experts each token visits, per MoE layer: from a real forward (trace) or synthetic.

A ``Routing`` holds one ``[tokens, k]`` integer array per MoE layer, tokens in the model's order (cls
token first, then patches row by row: the order a token-by-token design streams them in).

Synthetic routing (the default of ``m3vit hw simulate``), seeded and reproducible:

* ``alpha=None`` - uniform: every token picks k distinct experts uniformly at random, independently
  of the other tokens (what a perfectly balanced router looks like to the hardware).
* ``alpha=a`` - skewed: per layer, expert popularity ``p ~ Dirichlet(a, ..., a)``, and every token
  draws k distinct experts without replacement with probabilities proportional to ``p`` (Gumbel
  top-k). Small ``a`` (e.g. 0.3) concentrates tokens on few experts, large ``a`` approaches uniform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..utils.errors import ConfigError, InputError

__all__ = ["Routing", "synthetic_routing", "trace_routing"]


@dataclass(frozen=True)
class Routing:
    """Per MoE layer, ``indices[l][t]`` lists the k experts token ``t`` visits; ``source`` says where it came from."""

    indices: tuple[np.ndarray, ...]
    source: str

    def __post_init__(self):
        for i, layer in enumerate(self.indices):
            if layer.ndim != 2:
                raise InputError(f"routing of MoE layer {i} must be [tokens, k], got shape {list(layer.shape)}")

    def prefix(self, tokens: int) -> "Routing":
        """The routing of the first ``tokens`` tokens only."""
        return Routing(tuple(layer[:tokens] for layer in self.indices), f"{self.source}[:{tokens}]")


def synthetic_routing(num_layers: int, num_tokens: int, num_experts: int, top_k: int, seed: int = 0,
                      alpha: float | None = None) -> Routing:
    """Seeded synthetic routing (see the module docstring); ``alpha=None`` is uniform."""
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if num_tokens < 0 or num_layers < 0:
        raise ConfigError("num_tokens and num_layers must be >= 0")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"routing alpha must be a finite number > 0 (or None for uniform), got {alpha}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"routing seed must be an integer >= 0, got {seed!r}")
    layers = []
    for layer in range(num_layers):
        # one generator per layer: the routing of the first n tokens does not depend on how many follow
        rng = np.random.default_rng([seed, layer])
        popularity = rng.dirichlet(np.full(num_experts, float(alpha))) if alpha is not None else None
        scores = rng.random((num_tokens, num_experts))
        if popularity is not None:
            gumbel = -np.log(-np.log(np.clip(scores, 1e-12, 1 - 1e-12)))
            scores = np.log(np.maximum(popularity, 1e-300)) + gumbel
        layers.append(np.argsort(-scores, axis=1, kind="stable")[:, :top_k].astype(np.int64))
    source = "uniform" if alpha is None else f"dirichlet(alpha={alpha})"
    return Routing(tuple(layers), f"synthetic {source}, seed {seed}")


def trace_routing(model, image, task: str, size: Sequence[int] | None = None) -> Routing:
    """Run ``model`` on one image (``[3, H, W]`` in [0, 1]) for ``task`` and read each MoE layer's
    ``last_routing["indices"]``; ``size`` is the network input size (default the model's img_size)."""
    from ..engine.inference import check_input_size, predict_checked

    task = model.resolve_tasks([task])[0]
    if not model.moe_layers:
        raise InputError(f"model {model.config.name!r} has no MoE layer: there is no routing to trace")
    size = check_input_size(model, size)
    predict_checked(model, [image], [task], size)
    layers = tuple(layer.last_routing["indices"].cpu().numpy().astype(np.int64) for layer in model.moe_layers)
    return Routing(layers, f"trace of task {task!r} at {size[0]}x{size[1]}")
