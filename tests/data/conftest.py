"""Builders of tiny on-disk fixture trees in the PASCAL_MT and NYUD_MT layouts (no downloads).

Each builder writes the files and returns what it wrote (raw arrays) plus the labels the loader is
expected to produce, derived here from the written arrays by the layout's documented rules. Tests
reach the builders and constants through the ``kit`` fixture (never ``import conftest``, which
would be ambiguous once other test folders have their own conftest).
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.io
from PIL import Image

H, W = 24, 32
IGNORE = 255


@dataclass
class Tree:
    root: str
    ids: dict[str, list[str]]                      # split -> ids
    raw: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)       # id -> kind -> written array
    expected: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # id -> task -> label


def _save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _save_jpg(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def _write_split(root: str, rel: str, ids: list[str]) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(ids) + "\n")


def part_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0))
    out = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for i, (name, mask) in enumerate(parts):
        out[0, i] = (name, mask.astype(np.uint8))
    return out


def save_parts_mat(path: str, image_id: str, objects: list[tuple[str, int, np.ndarray, list]]) -> None:
    """A PASCAL-Part style ``anno`` struct: objects (class, class_ind, mask, parts(part_name, mask))."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, class_ind, mask, parts) in enumerate(objects):
        objs[0, i] = (name, np.array([[class_ind]], dtype=np.uint8), mask.astype(np.uint8), part_struct(parts))
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {"anno": anno})


def _box(r0, r1, c0, c1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# PASCAL-Context LabelMap ids used by the fixtures: wall (440) and person (284) have normals in the
# reference's list, sky (360) does not.
WALL, PERSON, SKY = 440, 284, 360


def build_pascal(root: str, seed: int = 0) -> Tree:
    rng = np.random.default_rng(seed)
    ids = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}
    tree = Tree(root=root, ids=ids)
    for split, split_ids in ids.items():
        _write_split(root, f"ImageSets/Context/{split}.txt", split_ids)
    for n, image_id in enumerate(ids["train"] + ids["val"]):
        raw, exp = {}, {}
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        _save_jpg(f"{root}/JPEGImages/{image_id}.jpg", image)

        semseg = rng.integers(0, 21, (H, W)).astype(np.uint8)
        semseg[rng.random((H, W)) < 0.1] = IGNORE
        if n == 1:  # the VOC12 file wins over the pascal-context one, as in the reference
            _save_png(f"{root}/semseg/VOC12/{image_id}.png", semseg)
            _save_png(f"{root}/semseg/pascal-context/{image_id}.png", np.zeros((H, W), np.uint8))
        else:
            _save_png(f"{root}/semseg/pascal-context/{image_id}.png", semseg)
        exp["semseg"] = semseg.astype(np.int64)

        label_map = np.full((H, W), WALL, dtype=np.uint16)
        label_map[: H // 3] = SKY
        label_map[10:20, 5 + n:15 + n] = PERSON
        os.makedirs(f"{root}/pascal-context/trainval", exist_ok=True)
        scipy.io.savemat(f"{root}/pascal-context/trainval/{image_id}.mat", {"LabelMap": label_map})
        raw["label_map"] = label_map

        rgb = rng.integers(1, 256, (H, W, 3), dtype=np.uint8)
        rgb[rng.random((H, W)) < 0.1] = 0
        _save_png(f"{root}/normals_distill/{image_id}.png", rgb)
        vec = 2.0 * rgb.astype(np.float64) / 255.0 - 1.0
        vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
        invalid = (rgb == 0).all(-1) | (label_map == SKY)
        vec[invalid] = IGNORE
        exp["normals"] = vec.transpose(2, 0, 1)

        grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
        grey[0, :4] = [126, 127, 128, 129]
        _save_png(f"{root}/sal_distill/{image_id}.png", grey)
        exp["sal"] = (grey >= 128).astype(np.float32)[None]

        objects, parts_label = _pascal_objects(n)
        save_parts_mat(f"{root}/human_parts/{image_id}.mat", image_id, objects)
        exp["human_parts"] = parts_label
        tree.raw[image_id], tree.expected[image_id] = raw, exp
    return tree


def _pascal_objects(n: int):
    """Objects of image ``n`` and the part label they must give (group ids written out by hand)."""
    if n == 0:
        person = _box(2, 22, 2, 14)
        parts = [("hair", _box(2, 4, 4, 8)), ("head", _box(4, 6, 4, 8)), ("neck", _box(6, 7, 5, 7)),
                 ("torso", _box(7, 12, 3, 9)), ("luarm", _box(7, 10, 9, 11)), ("llarm", _box(10, 12, 9, 11)),
                 ("lhand", _box(12, 13, 9, 11)), ("ruleg", _box(12, 16, 3, 6)), ("rlleg", _box(16, 20, 3, 6)),
                 ("rfoot", _box(20, 22, 3, 6))]
        cat = _box(2, 10, 20, 30)
        objects = [("person", 15, person, parts), ("cat", 8, cat, [("head", _box(2, 4, 20, 24))]),
                   ("person", 15, _box(14, 22, 20, 30), [])]  # a person without part annotation
        label = np.zeros((H, W), np.int64)
        for box, group in [((2, 4, 4, 8), 1), ((4, 6, 4, 8), 1), ((6, 7, 5, 7), 2), ((7, 12, 3, 9), 2),
                           ((7, 10, 9, 11), 3), ((10, 12, 9, 11), 4), ((12, 13, 9, 11), 4), ((12, 16, 3, 6), 5),
                           ((16, 20, 3, 6), 6), ((20, 22, 3, 6), 6)]:
            label[box[0]:box[1], box[2]:box[3]] = group
        return objects, label
    if n == 1:  # no person: no part supervision at all
        return [("dog", 12, _box(3, 20, 3, 20), [("head", _box(3, 6, 3, 6))])], np.full((H, W), IGNORE, np.int64)
    # overlapping parts: the later one wins (reference order)
    objects = [("person", 15, _box(0, 24, 0, 32), [("rhand", _box(0, 10, 0, 10)), ("rear", _box(5, 15, 5, 15))])]
    label = np.zeros((H, W), np.int64)
    label[0:10, 0:10] = 4
    label[5:15, 5:15] = 1
    return objects, label


def build_nyud(root: str, seed: int = 0) -> Tree:
    rng = np.random.default_rng(seed)
    ids = {"train": ["0001", "0002"], "val": ["0003"]}
    tree = Tree(root=root, ids=ids)
    for split, split_ids in ids.items():
        _write_split(root, f"gt_sets/{split}.txt", split_ids)
    for n, image_id in enumerate(ids["train"] + ids["val"]):
        exp = {}
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        if n == 2:
            _save_png(f"{root}/images/{image_id}.png", image)
        else:
            _save_jpg(f"{root}/images/{image_id}.jpg", image)

        seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
        seg[0, :3] = [0, 1, 40]
        _save_png(f"{root}/segmentation/{image_id}.png", seg)
        exp["semseg"] = np.where(seg == 0, IGNORE, seg.astype(np.int64) - 1)

        depth = rng.uniform(0.5, 10.0, (H, W)).astype(np.float32)
        depth[rng.random((H, W)) < 0.1] = 0
        os.makedirs(f"{root}/depth", exist_ok=True)
        np.save(f"{root}/depth/{image_id}.npy", depth)
        exp["depth"] = np.where(depth == 0, IGNORE, depth)[None]

        if n == 1:  # PNG normals
            rgb = rng.integers(1, 256, (H, W, 3), dtype=np.uint8)
            rgb[rng.random((H, W)) < 0.1] = 0
            _save_png(f"{root}/normals/{image_id}.png", rgb)
            vec = 2.0 * rgb.astype(np.float64) / 255.0 - 1.0
            vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
            vec[(rgb == 0).all(-1)] = IGNORE
        else:
            vec = rng.normal(size=(H, W, 3))
            vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
            zero = rng.random((H, W)) < 0.1
            vec[zero] = 0
            os.makedirs(f"{root}/normals", exist_ok=True)
            np.save(f"{root}/normals/{image_id}.npy", vec.astype(np.float32))
            vec = vec.copy()
            vec[zero] = IGNORE
        exp["normals"] = vec.transpose(2, 0, 1)

        edge = (rng.random((H, W)) < 0.2).astype(np.uint8)
        if n == 2:
            _save_png(f"{root}/edge/{image_id}.png", edge * 255)
        else:
            os.makedirs(f"{root}/edge", exist_ok=True)
            np.save(f"{root}/edge/{image_id}.npy", edge.astype(np.float32))
        exp["edge"] = edge.astype(np.float32)[None]
        tree.expected[image_id] = exp
    return tree


@pytest.fixture
def pascal_tree(tmp_path) -> Tree:
    return build_pascal(str(tmp_path / "PASCAL_MT"))


@pytest.fixture
def nyud_tree(tmp_path) -> Tree:
    return build_nyud(str(tmp_path / "NYUD_MT"))


@pytest.fixture
def kit() -> types.SimpleNamespace:
    """The builders and constants of this module."""
    return types.SimpleNamespace(H=H, W=W, IGNORE=IGNORE, WALL=WALL, PERSON=PERSON, SKY=SKY,
                                 build_pascal=build_pascal, build_nyud=build_nyud, save_parts_mat=save_parts_mat)
