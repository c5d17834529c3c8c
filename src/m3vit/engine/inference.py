"""Inference on image files: run only the requested tasks' sparse pathways and write coloured PNGs (and raw arrays).

Each image (any format PIL reads, any size, converted to RGB after its EXIF orientation) is resized
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
from PIL import Image, ImageOps

from ..utils.io import OutputFolder, write_atomic
from ..tasks import Task
from .builders import build_tasks
from .evaluator import prepare_images

__all__ = ["ImageReadError", "InferenceResult", "read_image", "check_input_size", "predict", "decode_prediction",
           "output_stems", "infer_files"]

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file is missing, unreadable or corrupt; the message names the file."""


@dataclass
class InferenceResult:
    """What ``infer_files`` did: the images it processed, the files it wrote and the images it could not
    read (path, reason)."""

    processed: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as ``float32 [3, H, W]`` in ``[0, 1]`` (RGB, EXIF orientation applied)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{path}: not a readable image ({reason})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)


def check_input_size(model, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The network input size: ``size`` (H, W) or the model's ``img_size``; each must be a positive
    multiple of the patch size."""
    patch = model.config.patch_size
    if size is None:
        return tuple(model.config.img_size)
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {list(size)}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1 or h % patch or w % patch:
        raise ValueError(f"input size {h}x{w} must be positive multiples of the model's patch size {patch} "
                         f"(e.g. {max(patch, round(h / patch) * patch)}x{max(patch, round(w / patch) * patch)})")
    return h, w


@torch.no_grad()
def predict(model, image: torch.Tensor, tasks: Sequence[str] | None = None,
            size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Raw outputs ``{task: [C, H, W]}`` of one image ``[3, H, W]`` in ``[0, 1]``, at the image's own size.

    The image is resized to ``size`` (default the model's ``img_size``) for the network; only the
    pathways of ``tasks`` (default all) run.
    """
    tasks = model.resolve_tasks(tasks)
    size = check_input_size(model, size)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {list(image.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = model(prepare_images([image], size).to(device), tasks=tasks)
    finally:
        model.train(was_training)
    original = tuple(image.shape[-2:])
    out = {}
    for task in tasks:
        pred = outputs[task].float().cpu()
        if tuple(pred.shape[-2:]) != original:
            pred = F.interpolate(pred, size=original, mode="bilinear", align_corners=False)
        out[task] = pred[0]
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

    Two different files with the same stem raise ``ValueError`` naming both.
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
            raise ValueError(f"images {str(stems[stem])!r} and {str(path)!r} would write the same output files "
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


def infer_files(model, paths: Sequence[str | os.PathLike], tasks: Sequence[str] | None, out_dir: str | os.PathLike,
                *, size: Sequence[int] | None = None, save_npy: bool = False) -> InferenceResult:
    """Predict ``tasks`` (default all) for each image file and write ``out_dir/<stem>_<task>.png``
    (and ``.npy`` with ``save_npy``).

    Task names, the input size and output-name collisions are checked before any image is read; an
    image that cannot be read is recorded in ``result.failed`` and the rest are still processed.
    """
    tasks = model.resolve_tasks(tasks)
    size = check_input_size(model, size)
    if not paths:
        raise ValueError("no images given")
    stems = output_stems(paths)
    task_objs = build_tasks({t: model.config.tasks[t] for t in tasks})
    suffixes = (".png", ".npy") if save_npy else (".png",)
    result = InferenceResult()
    with OutputFolder(out_dir, kind="infer") as out:
        # Before any image is read: no output may replace a file m3vit did not write.
        out.claim(f"{stem}_{task}{suffix}" for stem in stems.values() for task in tasks for suffix in suffixes)
        for path, stem in stems.items():
            try:
                image = read_image(path)
            except ImageReadError as exc:
                log.info("skipping %s", exc)
                result.failed.append((path, str(exc)))
                continue
            preds = predict(model, image, tasks, size)
            for task in tasks:
                result.written.append(_save_png(task_objs[task].colorize(preds[task], kind="pred"),
                                                out.path(f"{stem}_{task}.png")))
                if save_npy:
                    result.written.append(_save_npy(decode_prediction(task_objs[task], preds[task]),
                                                    out.path(f"{stem}_{task}.npy")))
            result.processed.append(path)
            log.info("%s: wrote %s", path, ", ".join(f"{stem}_{t}" for t in tasks))
    return result
