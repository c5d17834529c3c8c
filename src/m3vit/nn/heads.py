"""Dense-prediction decoder heads (SETR progressive upsampling, as in the M³ViT reference)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SETRPUPHead"]


class SETRPUPHead(nn.Module):
    """SETR-PUP decoder: tokens -> grid -> ``stages`` x [conv3x3 + BN + ReLU, x2 bilinear] -> conv1x1.

    Drops the cls token, applies its own LayerNorm, reshapes the patch tokens to their grid, then
    each stage is a 3x3 convolution (``embed_dim`` -> ``channels`` in the first, ``channels`` ->
    ``channels`` after) with BatchNorm and ReLU followed by a x2 bilinear upsampling; a 1x1
    convolution gives ``out_channels``, resized (bilinear) to the input image size. Four stages undo
    a patch size of 16.
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
        x = x.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.classifier(x)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return x, features
