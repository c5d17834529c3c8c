"""Inference on image files: run only the requested tasks' sparse pathways and write coloured PNGs (and raw arrays).

Each image (any format PIL reads, read by ``m3vit.data.images.read_image``: RGB in [0, 1], EXIF
orientation applied, 16-bit and float images scaled by their real range) is resized
(bilinear) to the model's ``img_size`` or to a given size, ImageNet-normalised and run through
``model(images, tasks=[...])``, which activates only those tasks' routers, experts and heads. Each
raw output is upsampled (bilinear, as the evaluator does) back to the original image size, then
written as ``OUT/<image stem>_<task>.png`` (``Task.colorize(pred, kind="pred")``) and, on request,
``OUT/<image stem>_<task>.npy`` holding the decoded prediction at the original size:

==================================  ========================  ========================================
task                                dtype / shape             values
==================================  ========================  ========================================
``semseg``, ``human_parts``         uint8 ``[H, W]``          class ids (argmax of the logits)
``sal``, ``edge``                   float32 ``[H, W]``        probability, sigmoid of the logit
``normals``                         float32 ``[3, H, W]``     unit vectors (x right, y up, z to camera)
``depth``                           float32 ``[H, W]``        depth in the training labels' unit (m)
==================================  ========================  ========================================

Output names must be unique: two images with the same stem (``a/x.png`` and ``b/x.jpg``) would write
the same files, so that is refused before anything is written (rename one or run them separately);
the same file given twice is processed once. ``OUT`` may be a new folder or any folder: m3vit keeps a
manifest of the files it wrote there (``m3vit.utils.io.OutputFolder``) and refuses, before reading any
image, to overwrite a file it did not write. Every file is written under a temporary name and renamed.
An image that cannot be read is reported in the result and skipped; the others are still written.

Large images: an image above ``max_pixels`` (default ``m3vit.data.images.MAX_PIXELS``, 50 M pixels;
``--max-pixels``) is refused from its header before decoding (reported like an unreadable one). Below
it, memory goes to the decoded image (about 22 bytes per pixel while reading, 12 kept until the
network has seen it) and then, one task at a time, to that task's outputs at full size: the PNG (3
bytes per pixel) and the ``.npy`` (1 to 12). Raw outputs are upsampled in strips of rows
(``upsample_rows``), so a task's ``C`` channels are never held at full size, except for tasks whose
picture depends on the whole map (``Task.pointwise_colors`` False, e.g. depth: ~35 bytes per pixel
while it is coloured). Measured on a 24 M pixel photo with the five PASCAL tasks and ``--npy``: 23
bytes per pixel (0.55 GB) above the model, so a 50 M pixel photo needs about 1.2 GB (2 GB with depth).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import MAX_PIXELS, ImageReadError, ImageTooLargeError, read_image
from ..models.config import check_input_size as check_size_rule
from ..models.modes import eval_mode
from ..utils.io import OutputFolder, write_atomic
from ..tasks import Task
from ..utils.errors import InputError
from .builders import build_tasks
from .evaluator import prepare_images

__all__ = ["ImageReadError", "ImageTooLargeError", "InferenceResult", "read_image", "check_input_size", "predict",
           "decode_prediction", "output_stems", "infer_files", "upsample_rows", "MAX_PIXELS"]

log = logging.getLogger(__name__)

#: Output rows upsampled, decoded and coloured at a time (bounds the memory of a task's C channels).
_STRIP_PIXELS = 1 << 20


@dataclass
class InferenceResult:
    """What ``infer_files`` did: the images it processed, the files it wrote and the images it could not
    read (path, reason)."""

    processed: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def check_input_size(model, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The network input size: ``size`` (H, W) or the model's ``img_size``, checked by the one input-size
    rule (``m3vit.models.config.check_input_size``: multiples of the patch size, bounded); ``InputError``."""
    if size is None:
        return tuple(model.config.img_size)
    return check_size_rule(size, model.config.patch_size, "size", error=InputError)


@torch.no_grad()
def _network_outputs(model, image: torch.Tensor, tasks: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Raw outputs ``{task: float32 [C, h, w]}`` (CPU) at the network's input size."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise InputError(f"image must be [3, H, W], got shape {list(image.shape)}")
    device = next(model.parameters()).device
    with eval_mode(model):
        outputs = model(prepare_images([image], size).to(device), tasks=tasks)
    return {task: outputs[task][0].float().cpu() for task in tasks}


def upsample_rows(pred: torch.Tensor, size: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.interpolate(pred[None], size, mode="bilinear", align_corners=False)[0]``
    for ``pred [C, h, w]``, computed from the few input rows they need (equal up to float rounding)."""
    h, w = pred.shape[-2:]
    out_h, out_w = (int(s) for s in size)
    rows = torch.arange(start, stop, dtype=torch.float64)
    source = ((rows + 0.5) * (h / out_h) - 0.5).clamp_(min=0)
    top = source.floor().long().clamp_(max=h - 1)
    bottom = (top + 1).clamp_(max=h - 1)
    weight = (source - top).to(pred.dtype)[:, None]
    first, last = int(top[0]), int(bottom[-1]) + 1
    band = pred[:, first:last]
    if w != out_w:
        band = F.interpolate(band[None], size=(last - first, out_w), mode="bilinear", align_corners=False)[0]
    upper, lower = band[:, top - first], band[:, bottom - first]
    return upper + (lower - upper) * weight


@torch.no_grad()
def predict(model, image: torch.Tensor, tasks: Sequence[str] | None = None,
            size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Raw outputs ``{task: [C, H, W]}`` of one image ``[3, H, W]`` in ``[0, 1]``, at the image's own size.

    The image is resized to ``size`` (default the model's ``img_size``) for the network; only the
    pathways of ``tasks`` (default all) run.
    """
    tasks = model.resolve_tasks(tasks)
    size = check_input_size(model, size)
    outputs = _network_outputs(model, image, tasks, size)
    original = tuple(image.shape[-2:])
    out = {}
    for task in tasks:
        pred = outputs[task]
        if tuple(pred.shape[-2:]) != original:
            pred = F.interpolate(pred[None], size=original, mode="bilinear", align_corners=False)[0]
        out[task] = pred
    return out


def decode_prediction(task: Task, pred: torch.Tensor) -> np.ndarray:
    """The array ``--npy`` saves for a raw output ``[C, H, W]`` (see the module docstring)."""
    if task.label_kind == "class":
        return pred.argmax(dim=0).numpy().astype(np.uint8)
    if task.name in ("sal", "edge"):
        return torch.sigmoid(pred[0]).numpy().astype(np.float32)
    if task.name == "normals":
        return F.normalize(pred, dim=0, eps=1e-12).numpy().astype(np.float32)
    if pred.shape[0] == 1:
        return pred[0].numpy().astype(np.float32)
    return pred.numpy().astype(np.float32)


def output_stems(paths: Sequence[str | os.PathLike]) -> dict[Path, str]:
    """Distinct images -> the stem their outputs are named by; the same file twice counts once.

    Two different files with the same stem raise ``InputError`` naming both.
    """
    stems: dict[str, Path] = {}
    out: dict[Path, str] = {}
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        stem = path.stem or path.name
        if stem in stems:
            raise InputError(f"images {str(stems[stem])!r} and {str(path)!r} would write the same output files "
                             f"({stem}_<task>.png); rename one or run them separately")
        stems[stem] = path
        out[path] = stem
    return out


def _save_png(rgb: np.ndarray, path: Path) -> Path:
    return write_atomic(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def _save_npy(array: np.ndarray, path: Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return write_atomic(path, write)


def _task_outputs(task: Task, pred: torch.Tensor, size: tuple[int, int], save_npy: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The picture ``uint8 [H, W, 3]`` and (with ``save_npy``) the decoded array of the network-size raw
    output ``pred [C, h, w]`` upsampled to ``size``: in strips of rows when the task's colours are pointwise."""
    height, width = size
    if not task.pointwise_colors or tuple(pred.shape[-2:]) == size:
        full = pred if tuple(pred.shape[-2:]) == size else F.interpolate(pred[None], size=size, mode="bilinear",
                                                                             align_corners=False)[0]
        return task.colorize(full, kind="pred"), decode_prediction(task, full) if save_npy else None
    picture = np.empty((height, width, 3), dtype=np.uint8)
    decoded = None
    step = max(1, _STRIP_PIXELS // width)
    for start in range(0, height, step):
        stop = min(start + step, height)
        strip = upsample_rows(pred, size, start, stop)
        picture[start:stop] = task.colorize(strip, kind="pred")
        if save_npy:
            rows = decode_prediction(task, strip)
            if decoded is None:
                decoded = np.empty((*rows.shape[:-2], height, width), dtype=rows.dtype)
            decoded[..., start:stop, :] = rows
    return picture, decoded


def infer_files(model, paths: Sequence[str | os.PathLike], tasks: Sequence[str] | None, out_dir: str | os.PathLike,
                *, size: Sequence[int] | None = None, save_npy: bool = False,
                max_pixels: int | None = MAX_PIXELS) -> InferenceResult:
    """Predict ``tasks`` (default all) for each image file and write ``out_dir/<stem>_<task>.png``
    (and ``.npy`` with ``save_npy``).

    Task names, the input size and output-name collisions are checked before any image is read; an
    image that cannot be read, or has more than ``max_pixels`` pixels (None: no limit but PIL's), is
    recorded in ``result.failed`` and the rest are still processed.
    """
    tasks = model.resolve_tasks(tasks)
    size = check_input_size(model, size)
    if not paths:
        raise InputError("no images given")
    stems = output_stems(paths)
    task_objs = build_tasks({t: model.config.tasks[t] for t in tasks})
    suffixes = (".png", ".npy") if save_npy else (".png",)
    result = InferenceResult()
    with OutputFolder(out_dir, kind="infer") as out:
        # Before any image is read: no output may replace a file m3vit did not write.
        out.claim(f"{stem}_{task}{suffix}" for stem in stems.values() for task in tasks for suffix in suffixes)
        for path, stem in stems.items():
            try:
                image = read_image(path, max_pixels=max_pixels)
            except ImageReadError as exc:
                log.info("skipping %s", exc)
                result.failed.append((path, str(exc)))
                continue
            original = (int(image.shape[-2]), int(image.shape[-1]))
            outputs = _network_outputs(model, image, tasks, size)
            del image  # the full-size image is no longer needed: free it before the full-size outputs
            for task in tasks:
                picture, decoded = _task_outputs(task_objs[task], outputs.pop(task), original, save_npy)
                result.written.append(_save_png(picture, out.path(f"{stem}_{task}.png")))
                del picture
                if decoded is not None:
                    result.written.append(_save_npy(decoded, out.path(f"{stem}_{task}.npy")))
            result.processed.append(path)
            log.info("%s: wrote %s", path, ", ".join(f"{stem}_{t}" for t in tasks))
    return result
