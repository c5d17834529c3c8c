"""Initialise a multi-task (MoE) ViT from a local ImageNet ViT checkpoint in the DeiT/timm layout.

Embeddings, attention, norms and dense MLPs map one to one (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``); the positional
embedding is resized to the model's grid with ``ModelConfig.pos_embed_resize`` (bilinear, the official
code's, for the registered models; a DeiT distillation token is dropped); the final ``norm``
initialises every task head's LayerNorm; classifier heads are ignored.

With ``ModelConfig.pretrained_experts = "init"`` the experts keep their initialisation, as in the
official code, whose DeiT loading cannot reach them (docs/reference.md). With ``"upcycle"`` (default)
the experts of an MoE block are initialised from that block's dense MLP (routers stay random):

* ``expert_hidden == mlp_hidden`` ("upcycle"): every expert is a copy of the dense MLP.
* ``mlp_hidden = n * expert_hidden`` ("split"): the dense hidden units are cut into ``n``
  contiguous slices; expert ``e`` takes slice ``e mod n`` of ``fc1`` (rows and bias) and of
  ``fc2`` (columns), and ``fc2``'s bias divided by ``n``. A token routed to one expert of every
  slice with combine weight 1 would reproduce the dense MLP exactly. With the paper's ViT-S
  setting (hidden 1536, experts 384) ``n = 4``.
* anything else raises an error: choose ``expert_ratio`` so that it divides ``mlp_ratio``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..utils.errors import CheckpointError
from .checkpoint import torch_load_failure
from .config import ConfigError
from .m3vit import MultiTaskModel, resample_pos_embed

__all__ = ["load_pretrained_vit", "read_state_dict", "expert_init_rule"]

_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias")
_MLP_KEYS = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` checkpoint; unwraps ``model``/``state_dict``
    containers and a ``module.`` prefix."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"pretrained checkpoint {str(path)!r} is a directory; give the weights file "
                              f"(.pth, .pt, .bin or .safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot read {str(path)!r} as a safetensors file: {reason}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's notice on pickles of protocol > 2 (plain pickles, not torch.save's)
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # torch.load's failures
            raise CheckpointError(f"{str(path)!r} is not a PyTorch or safetensors checkpoint of tensors "
                                  f"({torch_load_failure(path, exc)}); give a DeiT/ViT weights file holding only "
                                  f"tensors (.pth, .pt, .bin or .safetensors)") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def expert_init_rule(mlp_hidden: int, expert_hidden: int) -> tuple[str, int]:
    """``("upcycle", 1)`` or ``("split", n)`` for the documented expert initialisation."""
    if expert_hidden == mlp_hidden:
        return "upcycle", 1
    if expert_hidden < mlp_hidden and mlp_hidden % expert_hidden == 0:
        return "split", mlp_hidden // expert_hidden
    raise ConfigError(
        f"cannot initialise experts of hidden size {expert_hidden} from a dense MLP of hidden size "
        f"{mlp_hidden}: the expert hidden size must equal or divide it (set expert_ratio accordingly)"
    )


def _experts_from_dense(fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, num_experts: int,
                        expert_hidden: int) -> dict[str, Tensor]:
    rule, n = expert_init_rule(fc1_w.shape[0], expert_hidden)
    slices = [slice((e % n) * expert_hidden, (e % n + 1) * expert_hidden) for e in range(num_experts)]
    return {
        "w1": torch.stack([fc1_w[s].t() for s in slices]),
        "b1": torch.stack([fc1_b[s] for s in slices]),
        "w2": torch.stack([fc2_w[:, s].t() for s in slices]),
        "b2": (fc2_b / n).expand(num_experts, -1),
    }


def load_pretrained_vit(model: MultiTaskModel, path_or_state: str | os.PathLike | dict) -> dict:
    """Copy ImageNet ViT weights into ``model``'s backbone (and head norms). Returns a report with
    the ``loaded`` and ``ignored`` checkpoint keys and the expert initialisation ``rule``.

    Raises a ``ConfigError`` naming the key when a shape does not match or a needed key is missing, and a
    ``CheckpointError`` when the weights are no ViT's (no ``blocks.N.*`` keys: an m3vit checkpoint's, say).
    """
    src = path_or_state if isinstance(path_or_state, dict) else read_state_dict(path_or_state)
    cfg = model.config
    own = model.state_dict()
    new: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in src:
            raise ConfigError(f"pretrained checkpoint has no {key!r} (is it a DeiT/timm ViT state dict?)")
        used.add(key)
        return src[key]

    def put(dst: str, value: Tensor, src_key: str) -> None:
        if tuple(value.shape) != tuple(own[dst].shape):
            raise ConfigError(
                f"pretrained {src_key!r} has shape {list(value.shape)} but the model's {dst!r} needs "
                f"{list(own[dst].shape)} (embed_dim={cfg.embed_dim}, patch_size={cfg.patch_size})"
            )
        new[dst] = value.to(own[dst].dtype)

    if not any(k.startswith("blocks.") for k in src):
        where = "the pretrained state dict" if isinstance(path_or_state, dict) else \
            f"pretrained checkpoint {str(path_or_state)!r}"
        if any(k.startswith("backbone.") for k in src):  # MultiTaskModel's own keys
            raise CheckpointError(f"{where} holds no ViT backbone weights: it is an m3vit checkpoint's weights, which "
                                  f"commands take as --checkpoint <its folder> (and 'm3vit train --resume' continues); "
                                  f"model.pretrained needs a DeiT/ViT checkpoint")
        raise CheckpointError(f"{where} holds no ViT backbone weights (no 'blocks.N.*' keys of the DeiT/timm layout); "
                              f"give a DeiT/ViT checkpoint")
    depth = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    if depth != cfg.depth:
        raise ConfigError(f"pretrained checkpoint has {depth} blocks but the model has depth={cfg.depth}")

    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"):
        put(f"backbone.{key}", take(key), key)
    pos = take("pos_embed")
    grid_tokens = pos.shape[1] - 1 - (1 if "dist_token" in src else 0)
    if "dist_token" in src:
        used.add("dist_token")
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    if pos.shape[-1] != cfg.embed_dim:
        raise ConfigError(f"pretrained 'pos_embed' has width {pos.shape[-1]} but embed_dim={cfg.embed_dim}")
    try:
        pos = resample_pos_embed(pos, model.backbone.grid, mode=cfg.pos_embed_resize)
    except ValueError as exc:
        raise ConfigError(f"pretrained 'pos_embed' ({grid_tokens} grid tokens): {exc}") from None
    put("backbone.pos_embed", pos, "pos_embed")

    rule = None
    for i, block in enumerate(model.backbone.blocks):
        for key in _BLOCK_KEYS:
            put(f"backbone.blocks.{i}.{key}", take(f"blocks.{i}.{key}"), f"blocks.{i}.{key}")
        if block.is_moe and cfg.pretrained_experts == "init":
            rule = ("init", 0)
            continue  # the experts keep their initialisation; this block's dense MLP is reported as ignored
        dense = [take(f"blocks.{i}.{key}") for key in _MLP_KEYS]
        if block.is_moe:
            moe = block.mlp
            rule = expert_init_rule(dense[0].shape[0], moe.hidden_dim)
            for name, value in _experts_from_dense(*dense, moe.num_experts, moe.hidden_dim).items():
                put(f"backbone.blocks.{i}.mlp.{name}", value, f"blocks.{i}.mlp (as experts.{name})")
        else:
            for key, value in zip(_MLP_KEYS, dense):
                put(f"backbone.blocks.{i}.{key}", value, f"blocks.{i}.{key}")

    norm = [take("norm.weight"), take("norm.bias")]
    for task in model.tasks:
        put(f"heads.{task}.norm.weight", norm[0], "norm.weight")
        put(f"heads.{task}.norm.bias", norm[1], "norm.bias")

    model.load_state_dict(new, strict=False)
    return {
        "loaded": sorted(used),
        "ignored": sorted(set(src) - used),
        "rule": None if rule is None else {"name": rule[0], "slices": rule[1]},
    }
