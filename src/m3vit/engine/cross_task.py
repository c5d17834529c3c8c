"""An auxiliary cross-task head for training: every task's prediction refined from all tasks' predictions.

In the spirit of task-affinity modules (TAM, PAD-Net distillation): the tasks' raw outputs are
concatenated, mixed by a small convolution, and each task adds a learned correction to its own
prediction. Its losses (``train.cross_task_weight`` times the weighted task losses of the refined
predictions) add a cross-task training signal to the backbone and heads; the head itself is
training-only: it is kept in the trainer state for resuming and never saved into the model, so
inference and task-sparse pathways are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CrossTaskHead"]


class CrossTaskHead(nn.Module):
    """``forward({task: [B, C_t, H, W]}) -> {task: refined [B, C_t, H, W]}``.

    ``mix``: 3x3 conv over the concatenated predictions to ``hidden`` channels, GroupNorm, ReLU;
    ``refine[t]``: 1x1 conv back to ``C_t`` channels, zero-initialised so the head starts as the
    identity (refined = prediction) and learns only the cross-task correction.
    """

    def __init__(self, task_channels: dict[str, int], hidden: int = 32):
        super().__init__()
        if not task_channels:
            raise ValueError("the cross-task head needs at least one task")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.tasks = list(task_channels)
        total = sum(task_channels.values())
        self.mix = nn.Sequential(
            nn.Conv2d(total, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(1, hidden),
            nn.ReLU(inplace=True),
        )
        self.refine = nn.ModuleDict({t: nn.Conv2d(hidden, c, 1) for t, c in task_channels.items()})
        for conv in self.refine.values():
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, predictions: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [t for t in self.tasks if t not in predictions]
        if missing:
            raise ValueError(f"the cross-task head needs predictions for every task; missing {missing}")
        mixed = self.mix(torch.cat([predictions[t] for t in self.tasks], dim=1))
        return {t: predictions[t] + self.refine[t](mixed).to(predictions[t].dtype) for t in self.tasks}
