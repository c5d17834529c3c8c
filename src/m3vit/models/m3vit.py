"""M³ViT: a ViT backbone whose every other MLP is a task-routed mixture of experts, plus one
SETR-PUP head per task. With ``moe_blocks=()`` the same file is the dense multi-task M-ViT.

Read top to bottom: ``VisionTransformer`` (patch embedding, cls token, interpolated positional
embedding, blocks), then ``MultiTaskModel`` (task-batched backbone pass, one head per task). The named
configurations ``create_model`` builds are in ``models/zoo.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Block, Mlp, MoE, SETRPUPHead, TaskEmbedding
from ..utils.errors import ConfigError, InputError
from .config import ModelConfig

__all__ = ["VisionTransformer", "MultiTaskModel", "resample_pos_embed", "moe_block_indices"]


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix: int = 1, mode: str = "bicubic") -> Tensor:
    """Resize the grid part of ``pos_embed [1, prefix + h*w, D]`` from ``old_grid`` ``(h, w)`` to ``new_grid``
    (``mode``: ``"bicubic"`` or ``"bilinear"``, the official M³ViT's; ``align_corners=False``); the
    ``num_prefix`` leading (cls) tokens are kept as they are.

    ``old_grid=None`` infers a square grid from the token count (ImageNet ViT checkpoints are square).
    The same grid returns ``pos_embed`` itself. Interpolation runs in float32 (float64 stays float64)
    and the result has ``pos_embed``'s dtype.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"cannot resample a positional embedding of {n} grid tokens: not a square grid "
                             f"(give its grid as old_grid)")
        old_grid = (side, side)
    old_grid, new_grid = (int(old_grid[0]), int(old_grid[1])), (int(new_grid[0]), int(new_grid[1]))
    if old_grid[0] * old_grid[1] != n:
        raise InputError(f"a positional embedding of {n} grid tokens is not a {old_grid[0]}x{old_grid[1]} grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    compute = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).to(compute)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution from images to a grid of tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class VisionTransformer(nn.Module):
    """ViT backbone with MoE blocks at ``cfg.moe_blocks``; returns the tokens before any final norm.

    ``forward(images, task_ids)`` runs the task-independent prefix (patch embedding and the blocks
    before the first task-dependent MoE) once, then, for a task-dependent router and several tasks,
    stacks one copy of the tokens per task along the batch, each copy carrying its task id, and runs
    the remaining blocks in one batched pass. Output: ``[T, B, 1 + h*w, D]`` (``T = 1`` when the
    backbone is task-agnostic: dense or shared router) and the token grid ``(h, w)``.

    A task-conditioned backbone with ``cfg.task_embed == "model"`` owns one ``TaskEmbedding``
    (``self.task_embed``) that every MoE layer's router uses, as the official code does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.grid = (cfg.img_size[0] // cfg.patch_size, cfg.img_size[1] // cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        drop_path = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        num_tasks = max(1, len(cfg.tasks))
        shared = cfg.router == "task_conditioned" and cfg.task_embed == "model" and bool(cfg.moe_blocks)
        # The official embedding MLP ends in LayerNorm(eps=1e-6).
        self.task_embed = TaskEmbedding(num_tasks, cfg.task_embed_dim, eps=1e-6) if shared else None
        blocks = []
        for i in range(cfg.depth):
            if i in cfg.moe_blocks:
                # A block holding a subset of the experts (an extracted task): its gate scores all
                # experts ("all") or only the held ones ("kept"); see ModelConfig.
                held = cfg.expert_subsets.get(i)
                kept_gate = held is not None and cfg.gate_softmax == "kept"
                mlp = MoE(dim, cfg.expert_hidden, len(held) if kept_gate else cfg.num_experts,
                          min(cfg.top_k, cfg.experts_in_block(i)), num_tasks=num_tasks,
                          router=cfg.router, noise_std=cfg.noise_std, task_embed_dim=cfg.task_embed_dim,
                          renormalize=cfg.renormalize, capacity_factor=cfg.capacity_factor,
                          dispatch=cfg.dispatch, expert_ids=None if kept_gate else held,
                          balance_loss=cfg.balance_loss, init=cfg.init, task_embed=self.task_embed)
            else:
                mlp = Mlp(dim, cfg.mlp_hidden)
            blocks.append(Block(dim, cfg.num_heads, mlp, qkv_bias=cfg.qkv_bias, drop_path=drop_path[i]))
        self.blocks = nn.ModuleList(blocks)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.task_embed is not None:
            self.task_embed.reset_parameters()
        if self.cfg.init == "reference":  # the loop above also reached the routers' nn.Linear gates
            for layer in self.moe_layers:
                layer.router.reset_gate("reference")

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if b.is_moe]

    @property
    def task_dependent(self) -> bool:
        return any(m.task_dependent for m in self.moe_layers)

    @property
    def _first_task_block(self) -> int:
        for i, block in enumerate(self.blocks):
            if block.is_moe and block.mlp.task_dependent:
                return i
        return len(self.blocks)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, grid = self.patch_embed(images)
        pos = self.pos_embed if grid == self.grid else resample_pos_embed(self.pos_embed, grid, self.grid,
                                                                          mode=self.cfg.pos_embed_resize)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return x, grid

    def forward(self, images: Tensor, task_ids: Sequence[int] = (0,)) -> tuple[Tensor, tuple[int, int]]:
        batch = images.shape[0]
        x, grid = self.embed(images)
        split = self._first_task_block
        for block in self.blocks[:split]:
            x = block(x)
        task_ids = list(task_ids) if self.task_dependent else [0]
        copies = len(task_ids)
        if copies > 1:
            x = x.repeat(copies, 1, 1)
            ids = torch.tensor(task_ids, device=x.device).repeat_interleave(batch)
        else:
            ids = task_ids[0]
        for block in self.blocks[split:]:
            x = block(x, ids)
        return x.reshape(copies, batch, *x.shape[1:]), grid


class MultiTaskModel(nn.Module):
    """Backbone plus one SETR-PUP head per task; ``model(images, tasks=None) -> {task: [B, C, H, W]}``.

    ``tasks=None`` runs every task: one batched backbone pass over the tasks stacked along the
    batch (task-dependent routing) or one shared pass (dense / shared router). A subset of tasks
    runs only those tasks' routing, the experts they pick and their heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if not cfg.tasks:
            raise ConfigError("a multi-task model needs at least one task")
        self.config = cfg
        self.tasks: list[str] = list(cfg.tasks)
        self.backbone = VisionTransformer(cfg)
        self.heads = nn.ModuleDict(
            {t: SETRPUPHead(cfg.embed_dim, c, cfg.head_channels, cfg.head_stages) for t, c in cfg.tasks.items()}
        )

    def resolve_tasks(self, tasks: str | Sequence[str] | None) -> list[str]:
        """The requested task names in the order given, validated against the model's tasks."""
        if tasks is None:
            return list(self.tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(dict.fromkeys(tasks))
        unknown = [t for t in tasks if t not in self.heads]
        if unknown or not tasks:
            raise InputError(f"unknown task(s) {unknown or tasks}; this model's tasks are {self.tasks}")
        return tasks

    def check_images(self, images: Tensor) -> None:
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.in_chans:
            raise InputError(
                f"images must be [B, {cfg.in_chans}, H, W], got shape {list(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h < 1 or w < 1 or h % cfg.patch_size or w % cfg.patch_size:
            raise InputError(
                f"image size {h}x{w} is not divisible by the patch size {cfg.patch_size}; "
                f"resize or pad to a multiple of {cfg.patch_size}"
            )

    def forward(self, images: Tensor, tasks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        return self._forward(images, tasks, head_features=False)[0]

    def forward_features(self, images: Tensor, tasks: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        """The backbone's tokens for each requested task, what its head consumes: ``{task: [B, 1 + h*w, D]}``
        (cls token first, then the ``h x w`` patch grid, ``h, w = H // patch_size, W // patch_size``), before
        any norm. Runs only the backbone of those tasks' pathways (no head); a task-agnostic backbone (dense
        or shared router) gives every task the same tensor."""
        return self._tokens(images, tasks)[0]

    def forward_with_head_features(self, images: Tensor, tasks: str | Sequence[str] | None = None
                                   ) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """``forward`` plus each head's stage outputs (``SETRPUPHead.forward_stages``), for training-only
        cross-task modules: ``(outputs, {task: [stage 0, stage 1, ...]})``."""
        return self._forward(images, tasks, head_features=True)

    def _tokens(self, images: Tensor, tasks) -> tuple[dict[str, Tensor], tuple[int, int]]:
        """``forward_features`` and the token grid ``(h, w)``."""
        tasks = self.resolve_tasks(tasks)
        self.check_images(images)
        features, grid = self.backbone(images, [self.tasks.index(t) for t in tasks])
        return {task: features[i] if features.shape[0] > 1 else features[0] for i, task in enumerate(tasks)}, grid

    def _forward(self, images: Tensor, tasks, head_features: bool):
        features, grid = self._tokens(images, tasks)
        size = tuple(images.shape[-2:])
        outputs, stages = {}, {}
        for task, tokens in features.items():
            if head_features:
                outputs[task], stages[task] = self.heads[task].forward_stages(tokens, grid, size)
            else:
                outputs[task] = self.heads[task](tokens, grid, size)
        return outputs, stages

    @property
    def moe_layers(self) -> list[MoE]:
        return self.backbone.moe_layers

    def aux_loss(self) -> Tensor:
        """Sum of the MoE balance losses of the last forward (0 for a dense model or in eval)."""
        total = self.backbone.pos_embed.new_zeros(())
        for layer in self.moe_layers:
            total = total + layer.aux_loss()
        return total


def moe_block_indices(model: MultiTaskModel) -> list[int]:
    """Indices of the backbone blocks whose MLP is a mixture of experts."""
    return [i for i, block in enumerate(model.backbone.blocks) if block.is_moe]
