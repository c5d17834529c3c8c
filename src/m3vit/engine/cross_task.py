"""Training-only cross-task modules: extra predictions of every task made from all tasks at once.

Two kinds (``train.cross_task_module``), both switched on by ``train.cross_task_head``:

* ``tam`` -- ``TaskAttention``: the official M³ViT's task-attention module ("TAM",
  docs/reference.md), one ``TaskAttentionModule`` per level of the heads' intermediate features
  (``train.tam_levels``; level ℓ reads every head's stage ℓ + 1, stride 8, 4, 2 for a 4-stage head).
  Each level predicts every task; the predictions are upsampled (bilinear) to the image.
* ``predictions`` -- ``m3vit.nn.heads.CrossTaskHead``: every task's final prediction refined from all
  tasks' predictions (concatenated, mixed by a small convolution, a learned correction per task).

Their losses (``train.cross_task_weight`` times the weighted task losses of each extra prediction, the
task weights the same as the main ones) add a cross-task training signal to the backbone and heads.
The modules are training-only: kept in the trainer state for resuming and never saved into the
model, so inference and task-sparse pathways are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskAttentionModule", "TaskAttention", "CROSS_TASK_MODULES"]

#: ``train.cross_task_module`` values.
CROSS_TASK_MODULES = ("predictions", "tam")


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                         nn.BatchNorm2d(out_channels))


def _up_bn(channels: int) -> nn.Sequential:
    """x2 transposed convolution (3x3, padding 1, output padding 1) + BatchNorm."""
    return nn.Sequential(nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm2d(channels))


class TaskAttentionModule(nn.Module):
    """One level of the official task-attention module: ``forward({task: [B, C, h, w]}) -> {task: [B, C_t, h, w]}``.

    With the T task features ``f_t`` (T >= 2, in ``self.tasks`` order) and ``cat`` the channel concatenation:

    1. ``X = ReLU(BN(conv3x3(cat_t f_t)))`` (T·C -> C) and the balance map ``B = sigmoid(BN(conv3x3(X)))``;
    2. ``F_b = cat(f_t · B / g1 for the first g1 = ⌊T/2⌋ tasks, f_t · (1 - B) / g2 for the other g2 = T - g1)``;
    3. ``Y = ReLU(BN(conv3x3(F_b)))``, two stride-2 ``conv3x3 + BN + ReLU``, one x2 ``convT + BN + ReLU`` and
       the attention map ``M = sigmoid(BN(convT(Y)))`` (cropped to ``h x w`` when ``h`` or ``w`` is not a
       multiple of 4);
    4. ``F = cat_t f_t · (1 + M)``; each task ``out_t = conv1x1(ReLU(BN(conv3x3(F))))`` (T·C -> ``hidden`` -> C_t).

    Convolutions carry a bias and default PyTorch initialisation, as officially.
    """

    def __init__(self, task_channels: dict[str, int], channels: int, hidden: int | None = None):
        super().__init__()
        if len(task_channels) < 2:
            raise ValueError(f"the task-attention module needs at least two tasks, got {list(task_channels)}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        hidden = channels if hidden is None else hidden
        self.tasks = list(task_channels)
        total = len(self.tasks) * channels
        self.fuse = _conv_bn(total, channels)
        self.balance = _conv_bn(channels, channels)
        self.merge = _conv_bn(total, channels)
        self.down = nn.ModuleList([_conv_bn(channels, channels, stride=2) for _ in range(2)])
        self.up = nn.ModuleList([_up_bn(channels) for _ in range(2)])
        self.task_convs = nn.ModuleDict({t: _conv_bn(total, hidden) for t in self.tasks})
        self.task_outputs = nn.ModuleDict({t: nn.Conv2d(hidden, c, 1) for t, c in task_channels.items()})

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [t for t in self.tasks if t not in features]
        if missing:
            raise ValueError(f"the task-attention module needs features of every task; missing {missing}")
        f = [features[t] for t in self.tasks]
        h, w = f[0].shape[-2:]
        x = F.relu(self.fuse(torch.cat(f, dim=1)))
        b = torch.sigmoid(self.balance(x))
        first = len(f) // 2
        weighted = [t * b / first for t in f[:first]] + [t * (1 - b) / (len(f) - first) for t in f[first:]]
        y = F.relu(self.merge(torch.cat(weighted, dim=1)))
        for layer in self.down:
            y = F.relu(layer(y))
        y = F.relu(self.up[0](y))
        attention = torch.sigmoid(self.up[1](y))[..., :h, :w]
        fused = torch.cat([t * (1 + attention) for t in f], dim=1)
        return {t: self.task_outputs[t](F.relu(self.task_convs[t](fused))) for t in self.tasks}


class TaskAttention(nn.Module):
    """The official TAM at several levels of head features: ``forward({task: [stage 0, stage 1, ...]}, size)``
    returns one ``{task: [B, C_t, *size]}`` per level (level ℓ reads stage ℓ + 1), upsampled bilinearly."""

    def __init__(self, task_channels: dict[str, int], channels: int, levels: list[int]):
        super().__init__()
        if not levels or len(set(levels)) != len(levels) or min(levels) < 0:
            raise ValueError(f"levels must be distinct non-negative ints, got {levels}")
        self.levels = list(levels)
        self.modules_by_level = nn.ModuleDict({str(level): TaskAttentionModule(task_channels, channels)
                                               for level in self.levels})

    def forward(self, head_features: dict[str, list[Tensor]], size: tuple[int, int]) -> list[dict[str, Tensor]]:
        out = []
        for level in self.levels:
            stage = level + 1
            module = self.modules_by_level[str(level)]
            short = [t for t in module.tasks if len(head_features.get(t, ())) <= stage]
            if short:
                raise ValueError(f"TAM level {level} needs head stage {stage}; task(s) {short} have fewer stages")
            level_out = module({t: head_features[t][stage] for t in module.tasks})
            out.append({t: F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
                        for t, p in level_out.items()})
        return out
