"""Human-part segmentation: like semseg, but images without any part pixel are left out of the metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .colors import human_parts_palette
from .semseg import SemSeg

__all__ = ["HumanParts", "HUMAN_PART_NAMES"]

#: The six parts as PASCAL-Part is grouped for multi-task learning, after the background (id 0).
HUMAN_PART_NAMES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")


class HumanParts(SemSeg):
    """Human parts (label ``int64 [H, W]``: 0 background, 1..6 parts, 255 ignored).

    Options: ``num_classes`` (default 7 incl. background), ``class_names`` (default the PASCAL part
    groups when ``num_classes`` is 7, else the ids). The metric skips images with no part pixel
    (no label value in ``1..num_classes-1``), as the field evaluates parts only on images of people.
    """

    name = "human_parts"
    title = "human parts"
    default_channels = len(HUMAN_PART_NAMES)
    _skip_without_foreground = True
    class_names_attribute = "part_names"

    def __init__(self, num_classes: int = default_channels, class_names: Sequence[str] | None = None) -> None:
        if class_names is None and num_classes == len(HUMAN_PART_NAMES):
            class_names = HUMAN_PART_NAMES
        super().__init__(num_classes=num_classes, class_names=class_names)

    def palette(self) -> np.ndarray:
        return human_parts_palette(self.num_classes)
