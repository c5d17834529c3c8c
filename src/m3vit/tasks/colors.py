"""Colour palettes and colouring helpers shared by the tasks' ``colorize`` methods."""

from __future__ import annotations

import numpy as np
import torch

from ..utils.errors import ConfigError, DataError

__all__ = [
    "voc_palette", "human_parts_palette", "label_image", "gray_image", "colormap_image", "as_tensor", "check_kind",
]

#: Colour of ignored pixels in every picture.
IGNORED_RGB = (0, 0, 0)

# Human parts: background dark grey (so that ignored pixels, black, stay visible), then head, torso,
# upper arms, lower arms + hands, upper legs, lower legs + feet in clearly distinct hues.
_HUMAN_PARTS_RGB = np.array(
    [
        (40, 40, 40),
        (230, 25, 75),
        (245, 130, 48),
        (255, 225, 25),
        (60, 180, 75),
        (0, 130, 200),
        (145, 30, 180),
    ],
    dtype=np.uint8,
)


def voc_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC palette ``uint8 [num_classes, 3]``: the bits of the class id interleaved into R, G, B.

    Bit ``3k`` of the id becomes bit ``7-k`` of red, bit ``3k+1`` of green and bit ``3k+2`` of blue,
    so ids below ``2**24`` all get distinct colours (0 is black, 1 dark red, 2 dark green, ...).
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    ids = np.arange(num_classes, dtype=np.int64)
    rgb = np.zeros((num_classes, 3), dtype=np.int64)
    for k in range(8):
        for channel in range(3):
            bit = (ids >> (3 * k + channel)) & 1
            rgb[:, channel] |= bit << (7 - k)
    return rgb.astype(np.uint8)


def human_parts_palette(num_classes: int) -> np.ndarray:
    """Palette ``uint8 [num_classes, 3]`` for human parts (ids past the seven parts use the VOC colours)."""
    if num_classes <= len(_HUMAN_PARTS_RGB):
        return _HUMAN_PARTS_RGB[:num_classes].copy()
    return np.concatenate([_HUMAN_PARTS_RGB, voc_palette(num_classes)[len(_HUMAN_PARTS_RGB):]])


def as_tensor(x) -> torch.Tensor:
    """``x`` (tensor or array) as a detached CPU tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"colorize takes a torch tensor or a numpy array, got {type(x).__name__}")
    return x.detach().cpu()


def check_kind(kind: str) -> str:
    if kind not in ("auto", "pred", "label"):
        raise ValueError(f"kind must be 'auto', 'pred' or 'label', got {kind!r}")
    return kind


def label_image(ids: torch.Tensor, palette: np.ndarray, ignore: torch.Tensor) -> np.ndarray:
    """RGB picture of a class-id map ``[H, W]`` with ``palette``; ``ignore`` pixels black."""
    ids_np = ids.numpy().astype(np.int64)
    ignore_np = ignore.numpy()
    bad = (~ignore_np) & ((ids_np < 0) | (ids_np >= len(palette)))
    if bad.any():
        raise DataError(f"class ids must lie in 0..{len(palette) - 1} (or be ignored), found {int(ids_np[bad][0])}")
    rgb = palette[np.where(ignore_np, 0, ids_np)]
    rgb[ignore_np] = IGNORED_RGB
    return rgb


def gray_image(values: torch.Tensor, ignore: torch.Tensor) -> np.ndarray:
    """Grey picture of ``values`` in [0, 1], ``[H, W]``; ``ignore`` pixels black."""
    v = np.clip(values.double().numpy(), 0.0, 1.0)
    gray = np.round(v * 255.0).astype(np.uint8)
    gray[ignore.numpy()] = 0
    return np.repeat(gray[..., None], 3, axis=-1)


def colormap_image(values: torch.Tensor, ignore: torch.Tensor, cmap: str, vmin: float | None, vmax: float | None):
    """``values [H, W]`` through matplotlib colour map ``cmap`` over ``[vmin, vmax]`` (default: the valid range)."""
    import matplotlib  # deferred: only pictures need it

    if cmap not in matplotlib.colormaps:
        raise ConfigError(f"unknown matplotlib colour map {cmap!r}")
    v = values.double().numpy()
    valid = ~ignore.numpy()
    finite = valid & np.isfinite(v)
    lo = vmin if vmin is not None else (float(v[finite].min()) if finite.any() else 0.0)
    hi = vmax if vmax is not None else (float(v[finite].max()) if finite.any() else 1.0)
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    scaled = np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled, bytes=True)
    rgb = np.ascontiguousarray(rgba[..., :3])
    rgb[~valid] = IGNORED_RGB
    return rgb
