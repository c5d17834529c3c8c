"""Inference on image files: run only the requested tasks' sparse pathways and write coloured PNGs (and raw arrays).

``predict`` is the one way from images to predictions (evaluation, ``m3vit infer``, the demo report,
the routing trace, export calibration and expert usage all use it): images in ``[0, 1]`` go through
``m3vit.data.preprocess`` (resized to the model's ``img_size`` or a given size exactly as the training
``Resize`` does -- bilinear, antialiased when shrinking -- and ImageNet-normalised) and through
``model(images, tasks=[...])``, which activates only those tasks' routers, experts and heads; the raw
outputs are resized once, bilinearly, to ``out_size`` when asked.

``infer_files`` reads each image (any format PIL reads, read by ``m3vit.data.images.read_image``: RGB in
[0, 1], EXIF orientation applied, 16-bit and float images scaled by their real range), predicts, and
upsamples each raw output (bilinear, as the evaluator does) back to the original image size, then
writes ``OUT/<image stem>_<task>.png`` (``Task.colorize(pred, kind="pred")``) and, on request,
``OUT/<image stem>_<task>.npy`` holding the decoded prediction (``Task.decode``) at the original size:

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import MAX_PIXELS, ImageReadError, ImageTooLargeError, read_image
from ..data.transforms import preprocess
from ..models.config import check_input_size as check_size_rule
from ..models.modes import eval_mode
from ..tasks import Task
from ..tasks.base import resize_bilinear
from ..utils.errors import ConfigError, InputError
from ..utils.io import OutputFolder, write_atomic
from .builders import build_tasks

__all__ = ["ImageReadError", "ImageTooLargeError", "InferenceResult", "read_image", "check_input_size", "predict",
           "predict_checked", "PATHWAYS", "output_stems", "infer_files", "upsample_rows", "MAX_PIXELS"]

#: How ``predict`` runs several tasks: ``single`` one forward per task (its router, the experts it picks,
#: its head: what a deployed model does), ``all`` one batched forward of every task (the results agree).
PATHWAYS = ("single", "all")

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
    #: The task names predicted, as validated (in the order given).
    tasks: list[str] = field(default_factory=list)


def check_input_size(model, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The network input size: ``size`` (H, W) or the model's ``img_size``, checked by the one input-size
    rule (``m3vit.models.config.check_input_size``: multiples of the patch size, bounded); ``InputError``."""
    if size is None:
        return tuple(model.config.img_size)
    return check_size_rule(size, model.config.patch_size, "size", error=InputError)


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


def predict(model, images: Sequence[torch.Tensor] | torch.Tensor, tasks: Sequence[str] | None = None,
            out_size: Sequence[int] | None = None, *, size: Sequence[int] | None = None, pathway: str = "single",
            after_task: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Raw outputs ``{task: float32 [B, C, H, W]}`` (CPU) of ``images`` in ``[0, 1]`` (a list of
    ``[3, H, W]``, sizes may differ, or a batch ``[B, 3, H, W]``).

    Validates ``tasks`` (default all of the model's) and the network input ``size`` (default the model's
    ``img_size``), then runs ``predict_checked``: the images are preprocessed once (``m3vit.data.preprocess``),
    only the pathways of ``tasks`` run (``pathway``: see ``PATHWAYS``), and the outputs are resized once,
    bilinearly, to ``out_size`` (default: left at the network's resolution).
    """
    if pathway not in PATHWAYS:
        raise ConfigError(f"pathway must be {' or '.join(map(repr, PATHWAYS))}, got {pathway!r}")
    return predict_checked(model, images, model.resolve_tasks(tasks), check_input_size(model, size), out_size,
                           pathway=pathway, after_task=after_task)


@torch.no_grad()
def predict_checked(model, images: Sequence[torch.Tensor] | torch.Tensor, tasks: list[str], size: tuple[int, int],
                    out_size: Sequence[int] | None = None, *, pathway: str = "single",
                    after_task: Callable[[str], None] | None = None,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """``predict`` for a caller that validated ``tasks`` (``model.resolve_tasks``), ``size``
    (``check_input_size``) and ``pathway`` once at its own entry: a loop over batches does not check them again.

    ``after_task(task)`` is called right after each task's forward (``pathway="single"``; once with the
    last task for ``"all"``), while the MoE layers' ``last_routing`` still holds that task's routing.
    ``device`` is where the images go (default the model's).
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    batch = preprocess(images, size).to(device)
    with eval_mode(model):
        if pathway == "all":
            outputs = model(batch, tasks=tasks)
            if after_task is not None:
                after_task(tasks[-1])
        else:
            outputs = {}
            for task in tasks:
                outputs[task] = model(batch, tasks=[task])[task]
                if after_task is not None:
                    after_task(task)
    out = {}
    for task in tasks:
        pred = outputs[task].float().cpu()
        out[task] = pred if out_size is None else resize_bilinear(pred, out_size)
    return out


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
        full = resize_bilinear(pred[None], size)[0]
        return task.colorize(full, kind="pred"), task.decode(full) if save_npy else None
    picture = np.empty((height, width, 3), dtype=np.uint8)
    decoded = None
    step = max(1, _STRIP_PIXELS // width)
    for start in range(0, height, step):
        stop = min(start + step, height)
        strip = upsample_rows(pred, size, start, stop)
        picture[start:stop] = task.colorize(strip, kind="pred")
        if save_npy:
            rows = task.decode(strip)
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
    result = InferenceResult(tasks=list(tasks))
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
            # one forward for every task, as infer always did (the single pathways agree up to float rounding)
            outputs = {t: pred[0] for t, pred in predict_checked(model, [image], tasks, size, pathway="all").items()}
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
