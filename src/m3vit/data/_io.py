"""Shared plumbing of the folder datasets (PASCAL-Context MT, NYUD MT): file checks, readers, per-sample RNG.

``FolderDataset`` resolves every file of a split once at construction, so a missing root, folder,
split file or listed file fails early with one ``FileNotFoundError`` that names it; subclasses only
say where files live and how each label is decoded into the in-memory format of
``m3vit.tasks.base``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from ..tasks.base import IGNORE, resize_nearest
from ..utils.errors import ConfigError, DataError, InputError
from .config import DataSettings, configured_train_transforms
from .images import read_image
from .transforms import Compose, Normalize, Resize

__all__ = [
    "FolderDataset", "read_image", "read_png", "label_file", "read_split_file", "sample_rng", "mask_invalid",
    "unit_vectors",
]

logger = logging.getLogger(__name__)

#: How many missing files an error message lists before summarising the rest.
_MAX_LISTED_MISSING = 5


#: What readers (PIL, numpy, scipy) raise for a file they cannot decode.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


@contextmanager
def label_file(path: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn a reader's failure on label file ``path`` into one ``DataError`` naming it (a missing file
    stays ``FileNotFoundError``); ``errors`` adds exception types a reader raises beyond the usual."""
    try:
        yield
    except (FileNotFoundError, DataError):
        raise
    except (*_DECODE_ERRORS, *errors) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable label file ({reason})") from None


def read_png(path: str, mode: str | None = None) -> np.ndarray:
    """The pixel values of a label PNG (palette PNGs give their indices), optionally converted to ``mode``.

    A file that cannot be decoded raises ``DataError`` naming it (a missing one ``FileNotFoundError``).
    """
    with label_file(path), Image.open(path) as img:
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        return np.array(img)


def read_split_file(path: str) -> list[str]:
    """Image ids of a split file: one id per line, surrounding whitespace and blank lines dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            ids = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise DataError(f"split file {path} is not UTF-8 text (one image id per line expected)") from None
    ids = [i for i in ids if i]
    if not ids:
        raise DataError(f"split file {path} lists no image ids")
    return ids


def sample_rng(seed: int, split_code: int, index: int, epoch: int) -> np.random.Generator:
    """The generator a sample's transform draws from: a pure function of (seed, split, index, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, index, epoch, 1]))


class FolderDataset(torch.utils.data.Dataset):
    """Base of the on-disk multi-task datasets; see ``PascalContextMT`` and ``NYUDMT``.

    Subclasses set the class attributes below and implement ``_load_label(task, index, size)`` returning
    the label in the ``m3vit.tasks.base`` format at the file's resolution (it is resized to the
    image's size with nearest neighbours if the two differ).
    """

    #: ``meta["dataset"]``, also its name in ``m3vit.data.DATASETS``.
    dataset_name: str
    #: Name of the top folder in the documentation (``PASCAL_MT``, ``NYUD_MT``).
    tree_name: str
    #: The expected tree, shown in missing-root / missing-folder errors.
    tree: str
    #: Allowed splits, in the order that gives each its RNG code.
    splits: tuple[str, ...]
    #: Split file pattern relative to the root, with ``{split}``.
    split_pattern: str
    #: Candidate file patterns (relative to the root, with ``{id}``), first match wins, per file kind.
    file_patterns: Mapping[str, tuple[str, ...]]
    #: Tasks of the dataset, in the default order.
    all_tasks: tuple[str, ...]
    #: Read from files under ``root`` (not rendered); no people modes (``SyntheticScenes``' option).
    reads_files = True
    people_modes: tuple[str, ...] = ()
    #: Output channels of each task's head.
    channels: Mapping[str, int]
    #: Semantic classes, in id order.
    classes: tuple[str, ...]

    @classmethod
    def from_options(cls, split: str = "train", *, root: str | os.PathLike | None = None,
                     size: Sequence[int] | None = None, length: int | None = None, seed: int = 0,
                     tasks: Sequence[str] | None = None, transform: Callable | None = None,
                     people: str | None = None) -> "FolderDataset":
        """The dataset as ``m3vit.data.build_dataset`` describes it: read from ``root`` (needed); resized to
        ``size`` when it is given and ``transform`` is not (labels nearest, image not normalised); ``length``
        and ``people`` apply to the synthetic dataset only and are refused."""
        name = cls.dataset_name
        if root is None:
            raise ConfigError(f"dataset {name!r} needs its root folder (--root / data.root)")
        if length is not None:
            raise ConfigError(f"dataset {name!r} has a fixed length; 'length' applies to the synthetic dataset only")
        if people is not None:
            raise ConfigError(f"dataset {name!r} shows real people; 'people' applies to the synthetic dataset only")
        if transform is None and size is not None:
            transform = Resize(size)
        return cls(root, split, tasks=tasks, transform=transform, seed=seed)

    @classmethod
    def from_config(cls, data: DataSettings, split: str, *, train: bool) -> "FolderDataset":
        """The dataset of a run config's ``data`` section (``data.root``, ``data.seed``, ``data.tasks``).

        For training (``train=True``) the images are augmented by ``data.augment`` to ``data.size`` with the
        ``data.scale_rotate`` recipe (``reference``: the class's ``REFERENCE_SCALE_ROTATE`` when it declares
        one) or, with ``augment: none``, only resized and normalised. For evaluation they are untransformed:
        images in ``[0, 1]`` and labels at their own resolution (the evaluator resizes images itself).
        """
        transform = None
        if train:
            transform = (Compose([Resize(data.size), Normalize()]) if data.augment == "none" else
                         configured_train_transforms(data, cls))
        return cls.from_options(split, root=data.root, seed=data.seed, tasks=data.tasks, transform=transform,
                                people=data.people)

    def _setup(self, root: str | os.PathLike, split: str, tasks: Sequence[str] | None,
               transform: Callable | None, seed: int, extra_files: Mapping[str, Sequence[str]]) -> None:
        """Validate everything and resolve every file; ``extra_files`` maps task -> other file kinds it reads."""
        self.root = os.fspath(root)
        if split not in self.splits:
            raise ConfigError(f"split must be one of {list(self.splits)}, got {split!r}")
        self.split = split
        self.tasks = self._resolve_tasks(tasks)
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable as transform(sample, rng), got {transform!r}")
        self.transform = transform
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.task_channels = {t: self.channels[t] for t in self.tasks}

        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"{self.tree_name} root folder not found: {self.root} (expected the tree below)\n{self.tree}"
            )
        kinds = ["image"]
        for task in self.tasks:
            for kind in (task, *extra_files.get(task, ())):
                if kind not in kinds:
                    kinds.append(kind)
        for kind in kinds:
            self._check_folder(kind)
        split_file = os.path.join(self.root, self.split_pattern.format(split=split))
        if not os.path.isfile(split_file):
            raise FileNotFoundError(
                f"{self.tree_name}: split file not found: {split_file} (expected the tree below)\n{self.tree}"
            )
        self.ids = read_split_file(split_file)
        self._paths = self._resolve_files(kinds, split_file)

    def _resolve_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            return list(self.all_tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(dict.fromkeys(tasks))
        unknown = [t for t in tasks if t not in self.all_tasks]
        if unknown or not tasks:
            raise ConfigError(f"tasks must be a non-empty subset of {list(self.all_tasks)}, got {tasks!r}")
        return tasks

    def _folders(self, kind: str) -> list[str]:
        return list(dict.fromkeys(os.path.dirname(p) for p in self.file_patterns[kind]))

    def _check_folder(self, kind: str) -> None:
        folders = self._folders(kind)
        if not any(os.path.isdir(os.path.join(self.root, f)) for f in folders):
            shown = " or ".join(os.path.join(self.root, f) for f in folders)
            raise FileNotFoundError(
                f"{self.tree_name}: missing folder {shown} (needed for {kind!r}; expected the tree below)\n"
                f"{self.tree}"
            )

    def _resolve_files(self, kinds: Sequence[str], split_file: str) -> dict[str, list[str]]:
        listings: dict[str, frozenset[str]] = {}

        def listing(folder: str) -> frozenset[str]:
            if folder not in listings:
                full = os.path.join(self.root, folder)
                listings[folder] = frozenset(os.listdir(full)) if os.path.isdir(full) else frozenset()
            return listings[folder]

        paths: dict[str, list[str]] = {}
        missing: list[str] = []
        for kind in kinds:
            found = []
            for image_id in self.ids:
                candidates = [p.format(id=image_id) for p in self.file_patterns[kind]]
                match = next((c for c in candidates if os.path.basename(c) in listing(os.path.dirname(c))), None)
                if match is None:
                    missing.append(" or ".join(os.path.join(self.root, c) for c in candidates))
                else:
                    found.append(os.path.join(self.root, match))
            paths[kind] = found
        if missing:
            listed = "\n".join(f"  {m}" for m in missing[:_MAX_LISTED_MISSING])
            more = len(missing) - _MAX_LISTED_MISSING
            raise FileNotFoundError(
                f"{self.tree_name}: {len(missing)} file(s) for ids listed in {split_file} are missing, "
                f"first: {missing[0]}\n{listed}" + (f"\n  ... and {more} more" if more > 0 else "")
            )
        return paths

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream: the transform RNG depends on (seed, split, index, epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise InputError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def rng(self, index: int) -> np.random.Generator:
        """The generator handed to the transform for sample ``index`` in the current epoch."""
        return sample_rng(self.seed, self.splits.index(self.split), index, self.epoch)

    def _load_label(self, task: str, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Label ``task`` of sample ``index``; ``size`` is the image's (H, W), for labels without one."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = int(index)
        image = read_image(self._paths["image"][index])
        size = (int(image.shape[-2]), int(image.shape[-1]))
        sample: dict = {"image": image}
        for task in self.tasks:
            label = self._load_label(task, index, size)
            if tuple(label.shape[-2:]) != size:
                logger.warning("%s: %s label of %s is %s, image is %s; resizing the label (nearest)",
                               self.tree_name, task, self.ids[index], tuple(label.shape[-2:]), size)
                label = resize_nearest(label, size)
            sample[task] = label
        sample["meta"] = {"dataset": self.dataset_name, "split": self.split, "index": index,
                          "id": self.ids[index], "size": size}
        if self.transform is not None:
            sample = self.transform(sample, self.rng(index))
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, tasks={self.tasks}, "
                f"samples={len(self)})")


def unit_vectors(vectors: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Normals ``[H, W, 3]`` as unit vectors ``float32 [3, H, W]``; ``IGNORE`` where ``invalid``, zero or non-finite."""
    x, y, z = (np.ascontiguousarray(vectors[..., i], dtype=np.float64) for i in range(3))
    length = np.sqrt(x * x + y * y + z * z)
    bad = invalid | ~np.isfinite(length) | (length < 1e-6)
    length[bad] = 1.0
    out = np.stack([x / length, y / length, z / length]).astype(np.float32)
    out[:, bad] = IGNORE
    return out


def mask_invalid(values: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """``values [..., H, W]`` with ``IGNORE`` wherever ``invalid [H, W]`` is true (all leading channels)."""
    out = values.copy()
    out[..., invalid] = IGNORE
    return out
