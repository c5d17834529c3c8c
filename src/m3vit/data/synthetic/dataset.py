"""The ``SyntheticScenes`` dataset: sample ``i`` of a split is the scene drawn from ``(seed, split, i)``,
rendered at the dataset's size, as a dict of tensors (image, the requested labels, meta)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...models.config import MAX_INPUT_SIDE
from ...utils.errors import ConfigError
from .._geometry import RayCaster
from ..config import DataSettings, configured_train_transforms
from ..transforms import Compose, Normalize
from .rendering import RenderedScene, gaussian_field, render_scene
from .scenes import CLASSES, PART_NAMES, PEOPLE_MODES, Scene, sample_scene

__all__ = ["SyntheticScenes", "SPLIT_CODES", "SYNTHETIC_TASKS"]

#: Fixed split codes: they enter the seed, so the splits draw from disjoint random streams.
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
#: Tasks the dataset provides labels for, in their canonical order.
SYNTHETIC_TASKS: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals", "edge", "depth")


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SyntheticScenes(Dataset):
    """Procedural indoor scenes (room, objects, articulated people) with six exact dense labels.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split draws from its own seed stream.
        size: ``(H, W)`` of the images, each >= 16.
        length: number of samples (any index below it is a distinct scene).
        seed: non-negative base seed; sample ``i`` is a pure function of ``(split, i, seed)``: its
            generator is ``np.random.default_rng(SeedSequence([seed, SPLIT_CODES[split], i]))``.
        tasks: labels to return (default all of ``SYNTHETIC_TASKS``; one name or a sequence).
        transform: optional ``transform(sample, rng) -> sample``; ``rng`` is a ``numpy`` Generator from
            ``SeedSequence([seed, split_code, i, epoch, 1])`` so augmentation is reproducible and changes
            with :meth:`set_epoch` (with ``DataLoader`` workers, call it before creating each epoch's
            iterator; persistent workers keep the epoch they were started with).
        people: ``"sparse"`` (default) or ``"close"``, see ``PEOPLE_MODES``: how many people a scene
            holds and how near they stand; everything else is drawn from the same distributions.

    Each sample is a dict: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``, the requested labels in the
    format of ``m3vit.tasks.base`` and ``meta`` ``{"dataset", "split", "index", "id"}``:

    * ``semseg`` int64 ``[H, W]``: index into :attr:`classes` (255 where a ray hits nothing, which the
      closed room prevents in practice).
    * ``human_parts`` int64 ``[H, W]``: 0 on every non-person pixel, 1 head, 2 torso, 3 upper arm,
      4 lower arm + hand, 5 upper leg, 6 lower leg + foot on person pixels.
    * ``sal`` float32 ``[1, H, W]``: 1 on the salient instances. Rule: an instance (person or object,
      never a room surface) counts only if it covers at least ``MIN_SALIENT_FRACTION`` of the image.
      Every such person is salient; with no person, the object covering the most pixels is (ties: the
      first placed); in both cases every other object covering at least ``SALIENT_AREA_RATIO`` (1.0)
      times as many pixels as the largest salient instance is salient too (a big object in front is as
      salient as the people). A scene without a counted instance has an empty map.
    * ``normals`` float32 ``[3, H, W]``: camera-space outward unit normals of the visible surfaces
      (x right, y up, z towards the camera), 255 in all channels where no ray hits.
    * ``depth`` float32 ``[1, H, W]``: z-depth in metres, i.e. the distance of the hit point along the
      camera's viewing axis (not along the ray), > 0; 255 where no ray hits.
    * ``edge`` float32 ``[1, H, W]``: 1 on a pixel whose right or lower neighbour belongs to another
      instance (each wall, the floor, the ceiling, each object and each person is one instance; the
      parts of one person are not separated). Boundaries are therefore exactly one pixel wide and lie
      on the upper/left side of every change.

    The camera: height 1.2-2.1 m, pitch 5-25 degrees down, roll 0, horizontal field of view 55-65
    degrees, square pixels; :meth:`scene` returns the full scene description of an index and
    :meth:`render` all its arrays (with the instance and primitive maps). The image is albedo
    (procedural textures on the room, flat colours on objects and clothes) times ambient plus Lambert
    diffuse light from one random direction above (no shadows), then brightness, contrast and
    per-channel gain jitter and Gaussian sensor noise (std 0.005-0.025), clipped to ``[0, 1]``.
    """

    classes: tuple[str, ...] = CLASSES
    part_names: tuple[str, ...] = PART_NAMES
    #: Every task the scenes have labels for (the dataset's declaration, as the folder datasets' ``all_tasks``).
    all_tasks: tuple[str, ...] = SYNTHETIC_TASKS
    #: Rendered, not read (no ``root``); how many people and how close (``PEOPLE_MODES``).
    reads_files = False
    people_modes: tuple[str, ...] = tuple(PEOPLE_MODES)
    #: Per-task loss weights of the reference recipe (PASCAL-Context's, and NYUD's depth weight).
    REFERENCE_LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0,
                              "depth": 1.0}

    def __init__(
        self,
        split: str = "train",
        size: Sequence[int] = (128, 128),
        length: int = 1000,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict, np.random.Generator], dict] | None = None,
        people: str = "sparse",
    ):
        if split not in SPLIT_CODES:
            raise ConfigError(f"unknown split {split!r}; allowed splits are {list(SPLIT_CODES)}")
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
            raise ConfigError(f"size must be a pair (H, W) of ints >= 16, got {size!r}")
        height, width = (_positive_int("size", s, 16) for s in size)
        if max(height, width) > MAX_INPUT_SIDE:
            raise ConfigError(f"size {height}x{width}: each side must be <= {MAX_INPUT_SIDE} pixels")
        if tasks is None:
            tasks = SYNTHETIC_TASKS
        elif isinstance(tasks, str):
            tasks = [tasks]
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; SyntheticScenes provides {list(SYNTHETIC_TASKS)}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable as transform(sample, rng), got {transform!r}")
        if people not in PEOPLE_MODES:
            raise ValueError(f"unknown people mode {people!r}; allowed: {', '.join(PEOPLE_MODES)}")
        self.people = people
        self.split = split
        self.size = (height, width)
        self.length = _positive_int("length", length, 1)
        self.seed = _positive_int("seed", seed, 0)
        self._tasks = tuple(t for t in SYNTHETIC_TASKS if t in set(tasks))
        self.transform = transform
        self._epoch = 0
        self._caster = RayCaster(height, width)
        self._noise_field = gaussian_field(height, width)

    @classmethod
    def from_options(cls, split: str = "train", *, root: str | None = None, size: Sequence[int] | None = None,
                     length: int | None = None, seed: int = 0, tasks: Sequence[str] | None = None,
                     transform: Callable[[dict, np.random.Generator], dict] | None = None,
                     people: str | None = None) -> "SyntheticScenes":
        """The dataset as ``m3vit.data.build_dataset`` describes it: rendered at ``size`` (default 128x128),
        ``length`` samples (default 1000), ``people`` ``"sparse"`` when None; a ``root`` is refused."""
        if root is not None:
            raise ConfigError("the synthetic dataset is rendered, not read: drop --root / data.root")
        return cls(split, size=(128, 128) if size is None else size, length=1000 if length is None else length,
                   seed=seed, tasks=tasks, transform=transform, people=people or "sparse")

    @classmethod
    def from_config(cls, data: DataSettings, split: str, *, train: bool) -> "SyntheticScenes":
        """The scenes of a run config's ``data`` section: rendered at ``data.size``, ``data.train_length``
        (``train=True``) or ``data.val_length`` samples, ``data.seed``, ``data.tasks``, ``data.people``.

        For training the images are augmented by ``data.augment`` with the ``data.scale_rotate`` recipe (the
        PASCAL one: the scenes have no reference recipe of their own) or, with ``augment: none``, only
        normalised (they are rendered at ``data.size`` already). For evaluation they are untransformed.
        """
        transform = None
        if train:
            transform = Compose([Normalize()]) if data.augment == "none" else configured_train_transforms(data, cls)
        return cls.from_options(split, root=data.root, size=data.size,
                                length=data.train_length if train else data.val_length, seed=data.seed,
                                tasks=data.tasks, transform=transform, people=data.people)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The labels each sample carries, in canonical order."""
        return self._tasks

    @property
    def task_channels(self) -> dict[str, int]:
        """Output channels a model head needs per task of this dataset."""
        channels = {"semseg": len(self.classes), "human_parts": len(PART_NAMES), "sal": 1, "normals": 3,
                    "edge": 1, "depth": 1}
        return {t: channels[t] for t in self._tasks}

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (scenes themselves never change)."""
        self._epoch = _positive_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.length

    def _check_index(self, index: int) -> int:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index out of range for SyntheticScenes of length {self.length}")
        return index

    def _seed_words(self, index: int) -> list[int]:
        return [self.seed, SPLIT_CODES[self.split], index]

    def scene(self, index: int) -> Scene:
        """The scene description of sample ``index`` (camera, room, primitives, light, jitter)."""
        index = self._check_index(index)
        return sample_scene(np.random.default_rng(np.random.SeedSequence(self._seed_words(index))), self.people)

    def render(self, index: int) -> RenderedScene:
        """All arrays of sample ``index`` (including the instance map), before any transform."""
        return self.render_scene(self.scene(index))

    def render_scene(self, scene: Scene) -> RenderedScene:
        """Render a scene description at this dataset's image size."""
        return render_scene(scene, self._caster, self._noise_field)

    @property
    def ray_caster(self) -> RayCaster:
        """The ray caster of this dataset's pixel grid."""
        return self._caster

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        rendered = self.render(index)
        sample: dict[str, Any] = {"image": torch.from_numpy(rendered.image)}
        for task in self._tasks:
            sample[task] = torch.from_numpy(getattr(rendered, task))
        sample["meta"] = {
            "dataset": "synthetic",
            "split": self.split,
            "index": index,
            "id": f"{self.split}-{self.seed}-{index:06d}" if self.people == "sparse" else
                  f"{self.split}-{self.seed}-{self.people}-{index:06d}",
        }
        if self.transform is not None:
            words = [*self._seed_words(index), self._epoch, 1]
            sample = self.transform(sample, np.random.default_rng(np.random.SeedSequence(words)))
        return sample

    def __repr__(self) -> str:
        people = "" if self.people == "sparse" else f", people={self.people!r}"
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, length={self.length}, "
                f"seed={self.seed}, tasks={list(self._tasks)}{people})")
