"""The contract every dense-prediction task implements: label format, loss, metric, colouring, label transforms.

Label format in memory (one sample; a batch adds a leading ``B``):

========================  ===================  ==========================================================
task                      dtype / shape        values
========================  ===================  ==========================================================
``semseg``                int64 ``[H, W]``     class ids ``0..C-1``; ``IGNORE`` (255) where unlabelled
``human_parts``           int64 ``[H, W]``     0 background, 1..6 parts; 255 ignored
``sal``, ``edge``         float32 ``[1, H, W]`` 0 / 1; 255 ignored
``normals``               float32 ``[3, H, W]`` camera-space unit vectors (x right, y up, z towards the
                                               camera); 255 in all three channels where undefined
``depth``                 float32 ``[1, H, W]`` metres, > 0; 255 where unknown
========================  ===================  ==========================================================

Predictions handed to losses, metrics and ``colorize`` are raw model outputs (logits, unnormalised
normals, depth) of shape ``[B, C, H, W]`` (``colorize`` takes one ``[C, H, W]`` map). Predictions must
already have the label's spatial size; a mismatch raises ``ValueError``.

The label hooks (``flip_values``, ``rotate_values``, ``scale_values``) take one label ``[C, H, W]`` or
a batch ``[B, C, H, W]`` (channel dim ``-3``; class labels pass through unchanged).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import numpy
import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError

__all__ = ["IGNORE", "Task", "Metric", "check_batch", "check_positive_int", "resize_bilinear", "resize_nearest",
           "quantize_8bit", "PROTOCOLS"]

#: Evaluation protocols: ``default`` scores float predictions upsampled bilinearly to the label;
#: ``reference`` scores what the official M³ViT evaluation reads back from its saved files
#: (``Task.reference_prediction``; docs/reference.md).
PROTOCOLS = ("default", "reference")

#: Label value of every ignored pixel (all channels for normals).
IGNORE = 255


class Metric(abc.ABC):
    """Accumulates statistics over a whole dataset; ``compute`` reports them (percent where the field does)."""

    @abc.abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` raw outputs ``[B, C, H, W]``, ``target`` labels in the task's format."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything seen since construction or ``reset``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything seen."""


class Task(abc.ABC):
    """One dense-prediction task. Instances are cheap, stateless and configured by keyword options."""

    #: Registry name (``semseg``, ``human_parts``, ``sal``, ``normals``, ``edge``, ``depth``).
    name: ClassVar[str]
    #: ``"class"`` (int64 ``[H, W]``) or ``"dense"`` (float32 ``[C, H, W]``) labels.
    label_kind: ClassVar[str]
    #: Metric name -> True when higher is better (used by Δm and by model selection).
    higher_is_better: ClassVar[dict[str, bool]]
    #: The metric Δm and model selection use unless told otherwise.
    primary_metric: ClassVar[str]
    #: The metrics a report table shows, in order (every metric stays in the JSON); their direction is
    #: ``higher_is_better``.
    headline_metrics: ClassVar[tuple[str, ...]]
    #: Human-readable name for figure titles and tables ("human parts", "saliency").
    title: ClassVar[str]
    #: Output channels of the head when nothing says otherwise (``m3vit.models.TASK_CHANNELS``).
    default_channels: ClassVar[int]

    #: Channels of a dense label (``[C, H, W]``); class labels have none (``[H, W]``).
    label_channels: ClassVar[int] = 0

    #: ``new_metric`` options for the predictions ``reference_prediction`` gives.
    reference_metric_options: ClassVar[dict] = {}

    #: Output channels the model head needs for this task.
    channels: int

    #: True when ``colorize(pred, kind="pred")`` colours every pixel from its own values alone, so a large
    #: picture can be drawn in strips (``m3vit.engine.inference``); False when the colours depend on the
    #: whole map (depth: its value range).
    pointwise_colors: ClassVar[bool] = False

    @abc.abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of raw outputs ``pred [B, C, H, W]`` against labels; 0 (not NaN) with no valid pixel."""

    @abc.abstractmethod
    def new_metric(self, **opts) -> Metric:
        """A fresh dataset-level metric accumulator."""

    @abc.abstractmethod
    def colorize(self, x: torch.Tensor, kind: str = "auto") -> numpy.ndarray:
        """RGB ``uint8 [H, W, 3]`` picture of a raw prediction ``[C, H, W]`` or of a label.

        ``kind`` is ``"pred"``, ``"label"`` or ``"auto"`` (each task documents how it tells them apart).
        """

    def reference_prediction(self, pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """What the official evaluation scores for raw outputs ``pred [B, C, h, w]`` (the network's
        resolution) on labels of ``size``: by default the float map resized bilinearly (as the official
        code does for depth); tasks whose official predictions go through 8-bit or label files override it."""
        return resize_bilinear(pred, size)

    def metric_options(self, eval_cfg) -> dict:
        """``new_metric`` options taken from an evaluation config (``m3vit.engine.config.EvalSection``, or None
        for the defaults); most tasks have none."""
        return {}

    def decode(self, pred: torch.Tensor) -> numpy.ndarray:
        """The displayable values of one raw output ``[C, H, W]`` (what ``m3vit infer --npy`` saves): by
        default the output itself as float32, ``[H, W]`` for one channel; tasks whose outputs are logits or
        unnormalised vectors override it (class ids, probabilities, unit vectors)."""
        if pred.shape[0] == 1:
            return pred[0].numpy().astype(numpy.float32)
        return pred.numpy().astype(numpy.float32)

    @classmethod
    def metric_higher_is_better(cls, metric: str) -> bool:
        """Direction of ``metric`` for Δm and model selection; ``ValueError`` for a metric the task lacks."""
        if metric not in cls.higher_is_better:
            raise ConfigError(
                f"task {cls.name!r} has no metric {metric!r}; its metrics are {sorted(cls.higher_is_better)}"
            )
        return cls.higher_is_better[metric]

    def valid_mask(self, target: torch.Tensor) -> torch.Tensor:
        """Boolean mask of labelled pixels, ``[B, H, W]`` (or ``[H, W]`` for one label)."""
        if self.label_kind == "class":
            return target != IGNORE
        return (target != IGNORE).all(dim=-3)

    # --- how the label's *values* change under a geometric transform --------------------------
    # The joint transforms in ``m3vit.data.transforms`` move the pixels (nearest-neighbour for every
    # label, padding with IGNORE); these hooks fix up what the values mean afterwards. Defaults are
    # the identity: class ids, saliency, edges do not change with flips, rotations or scale.

    def flip_values(self, label: torch.Tensor) -> torch.Tensor:
        """Values after a horizontal flip of the pixels (normals negate x)."""
        return label

    def rotate_values(self, label: torch.Tensor, angle_deg: float) -> torch.Tensor:
        """Values after rotating the image content by ``angle_deg`` counter-clockwise as displayed."""
        return label

    def scale_values(self, label: torch.Tensor, scale: float) -> torch.Tensor:
        """Values after zooming the image by ``scale`` (> 1 enlarges; depth divides by it when asked)."""
        return label

    def resize_values(self, label: torch.Tensor) -> torch.Tensor:
        """Values after the pixels were resampled nearest-neighbour to a new size (normals renormalise)."""
        return label

    def resize_label(self, label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """One label ``[..., H, W]`` resized to ``size``: pixels nearest-neighbour (``resize_nearest``: values
        copied, never blended, so no new class id appears), then ``resize_values``."""
        return self.resize_values(resize_nearest(label, size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x [B, C, h, w]`` resized to ``size`` bilinearly with pixel centres (``align_corners=False``, no
    antialiasing: OpenCV's ``INTER_LINEAR``); unchanged when already that size."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_nearest(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label ``[..., H, W]`` to ``size`` (pixel centres: output pixel ``i``
    copies source pixel ``floor((i + 0.5) * in / out)``; values copied)."""
    h_in, w_in = label.shape[-2:]
    h_out, w_out = (int(s) for s in size)
    rows = ((torch.arange(h_out, dtype=torch.float64) + 0.5) * (h_in / h_out)).floor().long().clamp_(0, h_in - 1)
    cols = ((torch.arange(w_out, dtype=torch.float64) + 0.5) * (w_in / w_out)).floor().long().clamp_(0, w_in - 1)
    return label[..., rows[:, None], cols[None, :]]


def quantize_8bit(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The 8-bit PNG the official evaluation writes: ``values`` (in [0, 255], at the network's resolution)
    resized bilinearly to ``size`` and truncated to integers (``numpy.astype(uint8)``), as floats."""
    return resize_bilinear(values.double(), size).floor().clamp_(0, 255)


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, else ``ConfigError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def check_batch(task: Task, pred: torch.Tensor, target: torch.Tensor, *, pred_channels: int | None = None):
    """Validate a ``(pred [B, C, H, W], target)`` batch for ``task``; returns both.

    Class labels come back as ``[B, H, W]`` int64, dense labels as float on ``pred``'s device.

    Class labels may also come as ``[B, 1, H, W]``. ``pred_channels`` (default ``task.channels``) is
    the channel count the prediction must have.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{task.name}: pred and target must be torch tensors, got {type(pred).__name__} "
                         f"and {type(target).__name__}")
    if pred.dim() != 4:
        raise ValueError(f"{task.name}: pred must be [B, C, H, W], got shape {tuple(pred.shape)}")
    if not pred.is_floating_point():
        raise ValueError(f"{task.name}: pred must be a floating-point tensor (raw outputs), got {pred.dtype}")
    channels = task.channels if pred_channels is None else pred_channels
    if pred.shape[1] != channels:
        raise ValueError(f"{task.name}: pred has {pred.shape[1]} channels, the task expects {channels}")
    b, _, h, w = pred.shape
    if task.label_kind == "class":
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"{task.name}: labels must be an integer tensor of class ids, got {target.dtype}")
        expected = (b, h, w)
        target = target.long()
    else:
        if not target.is_floating_point():
            target = target.float()
        expected = (b, task.label_channels, h, w)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{task.name}: target shape {tuple(target.shape)} does not match pred {tuple(pred.shape)} "
            f"(expected {expected}; resize predictions to the label size first)"
        )
    return pred, target.to(pred.device)
