"""Joint transforms: one geometric change applied alike to the image and every label of a sample.

A transform is a callable ``t(sample, rng) -> sample`` on a dict of torch tensors: ``image``
``float32 [3, H, W]`` (in [0, 1] until ``Normalize``), labels keyed by task name in the format of
``m3vit.tasks.base``, and ``meta`` (passed through untouched: ``meta["size"]`` keeps the original
size). Randomness comes only from ``rng`` (a ``numpy.random.Generator``), so the datasets make
augmentation reproducible per (seed, split, index, epoch).

Pixels move the same way for every entry; labels are always sampled nearest-neighbour (values are
copied, never blended, so no new class ids appear and unit normals stay unit) and every pixel that
comes from outside the source is ``IGNORE`` (255, all channels) -- never a real class. The image
is sampled bilinearly and is 0 (black) outside the source. After moving the pixels the task's
hooks fix up what the values mean: ``flip_values`` (normals negate x), ``rotate_values`` (normals
rotate in the image plane), ``scale_values`` (depth divides by the zoom).

Conventions: pixel ``(row, col)`` has its centre at ``(row, col)``; the centre of rotation and
scaling is the image centre ``((H - 1) / 2, (W - 1) / 2)``. A positive angle rotates the content
counter-clockwise *as displayed* (row 0 at the top), and a scale > 1 enlarges it. Normals use
x right, y up, z towards the camera, so the same angle rotates their (x, y) counter-clockwise too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from ..tasks import TASK_CLASSES
from ..tasks.base import IGNORE, Task
from ..utils.errors import ConfigError, InputError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Transform", "Compose", "RandomHorizontalFlip", "RandomScaleRotate",
    "PadCrop", "Resize", "Normalize", "train_transforms", "eval_transforms", "warp_sample", "source_coordinates",
    "SCALE_ROTATE_RECIPES", "PASCAL_SCALE_ROTATE", "resize_image", "preprocess", "scale_rotate_recipe",
]

#: ImageNet channel statistics (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[dict, np.random.Generator], dict]

#: Scale-and-rotate recipes of a run (``data.scale_rotate``): ``reference`` is the official code's recipe
#: of the dataset (a dataset class may declare ``REFERENCE_SCALE_ROTATE``; the others use the PASCAL one),
#: ``pascal`` the PASCAL recipe for every dataset.
SCALE_ROTATE_RECIPES = ("reference", "pascal")
#: The official PASCAL-Context recipe: scale U(0.75, 1.25), rotation U(-20°, 20°).
PASCAL_SCALE_ROTATE = {"scales": (0.75, 1.25), "degrees": (-20.0, 20.0)}

#: Sample keys that are carried along untouched.
_PASS_THROUGH = ("meta",)

#: The task of each label key, resolved once (the label hooks do not depend on task options).
_LABEL_TASKS: Mapping[str, Task] = MappingProxyType({cls.name: cls() for cls in TASK_CLASSES})


# --- argument checks -------------------------------------------------------------------------------

def _as_size(size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an int or a pair (height, width) of positive ints, got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name} must be an int or a pair (height, width) of positive ints, got {size!r}")
    return int(h), int(w)


def _as_range(value, name: str, lower: float | None = None, lower_inclusive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{name} must be a finite pair with low <= high, got {value!r}")
    if lower is not None and (lo < lower or (lo == lower and not lower_inclusive)):
        bound = ">=" if lower_inclusive else ">"
        raise ConfigError(f"{name} must be {bound} {lower}, got {value!r}")
    return lo, hi


# --- sample helpers --------------------------------------------------------------------------------

def _entries(sample: dict) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Task]]]:
    """The image and ``{key: (label, task)}`` of a sample, checked for a common size."""
    if "image" not in sample:
        raise ConfigError(f"sample has no 'image' entry (keys: {sorted(sample)})")
    image = sample["image"]
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ConfigError(f"sample['image'] must be a tensor [C, H, W], got {getattr(image, 'shape', type(image))}")
    size = tuple(image.shape[-2:])
    labels = {}
    for key, value in sample.items():
        if key == "image" or key in _PASS_THROUGH:
            continue
        task = _LABEL_TASKS.get(key)
        if task is None:
            if isinstance(value, torch.Tensor):
                raise ConfigError(f"sample[{key!r}] is not a known task ({sorted(_LABEL_TASKS)}); cannot transform it")
            continue
        expected_ndim = 2 if task.label_kind == "class" else 3
        if not isinstance(value, torch.Tensor) or value.ndim != expected_ndim or tuple(value.shape[-2:]) != size:
            raise ConfigError(
                f"sample[{key!r}] must be a tensor with {expected_ndim} dims and spatial size {size}, "
                f"got {getattr(value, 'shape', type(value))}"
            )
        labels[key] = (value, task)
    return image, labels


# --- transforms ------------------------------------------------------------------------------------

class Compose:
    """Apply transforms in order, all drawing from the same ``rng``."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ConfigError(f"transforms must be callables t(sample, rng), got {t!r}")

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; labels' values follow (normals negate x)."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, labels = _entries(sample)
        if not rng.random() < self.p:
            return sample
        out = dict(sample)
        out["image"] = image.flip(-1)
        for key, (label, task) in labels.items():
            out[key] = task.flip_values(label.flip(-1))
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScaleRotate:
    """Zoom by ``s ~ U(scales)`` and rotate by ``a ~ U(degrees)`` (CCW as displayed) about the centre.

    ``scale_choices`` (optional) draws ``s`` uniformly from that list instead (the official NYUD recipe:
    {1.0, 1.2, 1.5} with ``degrees=(0, 0)``, i.e. never rotated).

    One affine warp, output the same size as the input. The image is sampled bilinearly
    (``grid_sample``, ``align_corners=False``: pixel centres at ``(2 i + 1) / n - 1``) and is 0 outside
    the source; labels are sampled nearest-neighbour at the same source positions and are ``IGNORE``
    outside it. Then ``task.rotate_values(label, a)`` and, if ``scale_depth``, ``task.scale_values(label,
    s)`` (depth / s: enlarging the picture is like moving the camera closer).
    """

    def __init__(self, scales: Sequence[float] = (0.75, 1.25), degrees: Sequence[float] = (-20, 20),
                 scale_depth: bool = True, scale_choices: Sequence[float] | None = None) -> None:
        self.scales = _as_range(scales, "scales", lower=0.0, lower_inclusive=False)
        self.degrees = _as_range(degrees, "degrees")
        self.scale_depth = bool(scale_depth)
        self.scale_choices = None
        if scale_choices is not None:
            try:
                choices = tuple(float(c) for c in scale_choices)
            except (TypeError, ValueError):
                raise ValueError(f"scale_choices must be a list of positive numbers, got {scale_choices!r}") from None
            if not choices or not all(math.isfinite(c) and c > 0 for c in choices):
                raise ValueError(f"scale_choices must be a non-empty list of positive numbers, got {scale_choices!r}")
            self.scale_choices = choices

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, labels = _entries(sample)
        if self.scale_choices is None:
            scale = float(rng.uniform(*self.scales))
        else:
            scale = self.scale_choices[int(rng.integers(len(self.scale_choices)))]
        angle = float(rng.uniform(*self.degrees))  # exactly 0.0 for degrees (0, 0)
        return warp_sample(sample, image, labels, scale, angle, self.scale_depth)

    def __repr__(self) -> str:
        scales = f"scale_choices={self.scale_choices}" if self.scale_choices is not None else f"scales={self.scales}"
        return f"RandomScaleRotate({scales}, degrees={self.degrees}, scale_depth={self.scale_depth})"


def source_coordinates(size: tuple[int, int], scale: float, angle_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output pixel, the (row, col) it samples in the source (``float64 [H, W]`` each).

    The forward map takes a source offset ``(dx, dy)`` from the centre (dy down) to
    ``s * (dx cos a + dy sin a, -dx sin a + dy cos a)``: counter-clockwise as displayed for a > 0.
    """
    h, w = size
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    a = math.radians(angle_deg)
    cos_a, sin_a = math.cos(a), math.sin(a)
    rows = torch.arange(h, dtype=torch.float64)[:, None] - cy
    cols = torch.arange(w, dtype=torch.float64)[None, :] - cx
    src_col = (cols * cos_a - rows * sin_a) / scale + cx
    src_row = (cols * sin_a + rows * cos_a) / scale + cy
    return src_row, src_col


def warp_sample(sample: dict, image: torch.Tensor, labels: dict[str, tuple[torch.Tensor, Task]],
                scale: float, angle_deg: float, scale_depth: bool = True) -> dict:
    """``sample`` zoomed by ``scale`` and rotated by ``angle_deg`` about its centre (see ``RandomScaleRotate``)."""
    h, w = image.shape[-2:]
    src_row, src_col = source_coordinates((h, w), scale, angle_deg)
    out = dict(sample)

    # grid_sample's (x, y) in [-1, 1] with align_corners=False: pixel i's centre is (2 i + 1) / n - 1.
    grid = torch.stack(((2 * src_col + 1) / w - 1, (2 * src_row + 1) / h - 1), dim=-1)
    warped = F.grid_sample(image[None].float(), grid[None].to(torch.float32), mode="bilinear",
                           padding_mode="zeros", align_corners=False)[0]
    out["image"] = warped.to(image.dtype)

    near_row = torch.floor(src_row + 0.5).long()
    near_col = torch.floor(src_col + 0.5).long()
    outside = (near_row < 0) | (near_row >= h) | (near_col < 0) | (near_col >= w)
    source_index = (near_row.clamp_(0, h - 1) * w + near_col.clamp_(0, w - 1)).flatten()
    for key, (label, task) in labels.items():
        moved = label.flatten(-2).index_select(-1, source_index).reshape(label.shape)
        moved = task.rotate_values(moved, angle_deg)
        if scale_depth:
            moved = task.scale_values(moved, scale)
        # Re-impose the out-of-view ignore after the hooks, whatever they do with 255.
        out[key] = moved.masked_fill(outside, IGNORE)
    return out


class PadCrop:
    """Cut a ``size`` window, padding where the input is smaller (labels 255, image 0).

    The window's top-left corner (in input pixels, negative where it pads) is drawn uniformly among
    all integer positions that keep as much of the image as possible (``random=True``), or centred
    (``random=False``; the extra pixel of an odd difference goes to the bottom / right).
    """

    def __init__(self, size, random: bool = True) -> None:
        self.size = _as_size(size)
        self.random = bool(random)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, labels = _entries(sample)
        h, w = image.shape[-2:]
        top = self._offset(h, self.size[0], rng)
        left = self._offset(w, self.size[1], rng)
        out = dict(sample)
        out["image"] = _window(image, top, left, self.size, 0.0)
        for key, (label, _) in labels.items():
            out[key] = _window(label, top, left, self.size, IGNORE)
        return out

    def _offset(self, have: int, want: int, rng: np.random.Generator) -> int:
        lo, hi = min(0, have - want), max(0, have - want)
        if not self.random:
            return (have - want) // 2 if have >= want else -((want - have) // 2)
        return int(rng.integers(lo, hi + 1))

    def __repr__(self) -> str:
        return f"PadCrop(size={self.size}, random={self.random})"


def _window(x: torch.Tensor, top: int, left: int, size: tuple[int, int], fill: float) -> torch.Tensor:
    """``x[..., top:top+h, left:left+w]`` with ``fill`` wherever the window leaves ``x``."""
    h, w = x.shape[-2:]
    out = torch.full((*x.shape[:-2], *size), fill, dtype=x.dtype)
    r0, r1 = max(top, 0), min(top + size[0], h)
    c0, c1 = max(left, 0), min(left + size[1], w)
    if r0 < r1 and c0 < c1:
        out[..., r0 - top:r1 - top, c0 - left:c1 - left] = x[..., r0:r1, c0:c1]
    return out


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """One image ``[C, H, W]`` resized to ``size``: bilinear with pixel centres (``align_corners=False``),
    antialiased when either side shrinks; unchanged when already that size. Computed in float32 (at
    least), returned in the image's dtype."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == size:
        return image
    shrinking = image.shape[-2] > size[0] or image.shape[-1] > size[1]
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking)[0].to(image.dtype)


def preprocess(images: Sequence[torch.Tensor] | torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Images in ``[0, 1]`` (a sequence of ``[3, H, W]``, sizes may differ, or a batch ``[B, 3, H, W]``) ->
    one ImageNet-normalised float32 batch ``[B, 3, *size]`` for the network.

    Exactly the evaluation transform ``Resize(size)`` then ``Normalize()`` per image (``resize_image``:
    bilinear, antialiased when shrinking), so a prediction sees what training saw.
    """
    size = _as_size(size)
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        raise InputError(f"preprocess takes a list of [3, H, W] images or a batch [B, 3, H, W], got one image "
                         f"{list(images.shape)}: wrap it in a list")
    images = list(images)
    if not images:
        raise InputError("preprocess needs at least one image")
    out = []
    for image in images:
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != len(IMAGENET_MEAN):
            raise InputError(f"each image must be a tensor [3, H, W], got {list(getattr(image, 'shape', []))}")
        out.append(resize_image(image.float(), size))
    batch = torch.stack(out)
    mean = torch.tensor(IMAGENET_MEAN, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


class Resize:
    """Resize to ``size``: image with ``resize_image`` (bilinear, antialiased when shrinking), labels with
    ``Task.resize_label`` (nearest, pixel centres; normals renormalised to unit length on valid pixels,
    ignored stay 255)."""

    def __init__(self, size) -> None:
        self.size = _as_size(size)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, labels = _entries(sample)
        if tuple(image.shape[-2:]) == self.size:
            return sample
        out = dict(sample)
        out["image"] = resize_image(image, self.size)
        for key, (label, task) in labels.items():
            out[key] = task.resize_label(label, self.size)
        return out

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class Normalize:
    """``image = (image - mean) / std`` per channel; labels untouched."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"mean and std must have one value per channel, got {mean!r} and {std!r}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {std!r}")

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image = sample.get("image")
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != len(self.mean):
            raise ValueError(f"sample['image'] must be a tensor [{len(self.mean)}, H, W], "
                             f"got {getattr(image, 'shape', type(image))}")
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        out = dict(sample)
        out["image"] = (image - mean) / std
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# --- factories -------------------------------------------------------------------------------------

def train_transforms(size, flip: bool = True, scales: Sequence[float] = (0.75, 1.25),
                     degrees: Sequence[float] = (-20, 20), scale_depth: bool = True, mode: str = "crop",
                     scale_choices: Sequence[float] | None = None) -> Compose:
    """Training augmentation: flip, scale-rotate, then to ``size``, then ImageNet normalisation.

    ``scales``/``degrees``/``scale_choices`` configure ``RandomScaleRotate``.

    ``mode="crop"`` (default) cuts a random ``size`` window, padding with 255 / 0 where the image is
    smaller (the training size of the issue); ``mode="resize"`` resizes to ``size`` as the reference
    code does (aspect ratio not kept).
    """
    size = _as_size(size)
    if mode not in ("crop", "resize"):
        raise ConfigError(f"mode must be 'crop' or 'resize', got {mode!r}")
    steps: list[Transform] = []
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    steps.append(RandomScaleRotate(scales, degrees, scale_depth, scale_choices))
    steps.append(PadCrop(size, random=True) if mode == "crop" else Resize(size))
    steps.append(Normalize())
    return Compose(steps)


def scale_rotate_recipe(recipe: str, reference: Mapping | None = None) -> dict:
    """``RandomScaleRotate`` options of ``recipe`` (``data.scale_rotate``): ``reference`` gives the dataset's
    own recipe ``reference`` (its ``REFERENCE_SCALE_ROTATE``; None: PASCAL's), ``pascal`` the PASCAL recipe."""
    if recipe not in SCALE_ROTATE_RECIPES:
        raise ValueError(f"recipe must be one of {list(SCALE_ROTATE_RECIPES)}, got {recipe!r}")
    if recipe == "reference" and reference is not None:
        return dict(reference)
    return dict(PASCAL_SCALE_ROTATE)


def eval_transforms(size) -> Compose:
    """Evaluation: resize to ``size`` (labels nearest) and ImageNet normalisation; no randomness."""
    return Compose([Resize(size), Normalize()])
