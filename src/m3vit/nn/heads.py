"""Dense-prediction decoder heads (SETR progressive upsampling, as in the M³ViT reference), and the cross-task
head that refines every task's prediction from all tasks' (``train.cross_task_module: predictions``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SETRPUPHead", "CrossTaskHead"]


class SETRPUPHead(nn.Module):
    """SETR-PUP decoder: tokens -> grid -> ``stages`` x [conv3x3 + BN + ReLU, x2 bilinear] -> conv1x1.

    Drops the cls token, applies its own LayerNorm, reshapes the patch tokens to their grid, then
    each stage is a 3x3 convolution (``embed_dim`` -> ``channels`` in the first, ``channels`` ->
    ``channels`` after) with BatchNorm and ReLU followed by a x2 bilinear upsampling; a 1x1
    convolution gives ``out_channels``, resized (bilinear) to the input image size. Four stages undo
    a patch size of 16.

    The 1x1 classifier runs *before* the last x2 upsampling, as in the reference head: both are
    linear and the upsampling mixes each channel on its own with weights that sum to one, so
    ``up(conv1x1(x)) == conv1x1(up(x))`` (bias included) and the classifier runs on 4x fewer pixels.
    The feature maps are ``channels_last`` (NHWC, as the tokens already are); the prediction is an
    ordinary contiguous NCHW tensor.
    """

    def __init__(self, embed_dim: int, out_channels: int, channels: int = 256, stages: int = 4):
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if stages < 1:
            raise ValueError(f"head stages must be >= 1, got {stages}")
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        convs = []
        for i in range(stages):
            convs.append(
                nn.Sequential(
                    nn.Conv2d(embed_dim if i == 0 else channels, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                )
            )
        self.stages = nn.ModuleList(convs)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        return self.forward_stages(tokens, grid, out_size)[0]

    def forward_stages(self, tokens: Tensor, grid: tuple[int, int],
                       out_size: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        """The prediction and every stage's output before its upsampling (conv + BN + ReLU, ``channels``
        wide, stage ``i`` at ``2^i`` times the token grid). A training-only cross-task module reads them."""
        batch, _, dim = tokens.shape
        x = self.norm(tokens[:, 1:])
        # The tokens [B, h*w, D] are already laid out NHWC: viewed as NCHW they are channels_last at no
        # copy, and the convolutions, BatchNorm and upsamplings keep that layout.
        x = x.reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)
        features = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features.append(x)
            if i == last:  # classifier first: equal to classifying the upsampled map, 4x cheaper
                x = self.classifier(x).contiguous()
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return x, features


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
