"""PascalContextMT on a tiny PASCAL_MT fixture tree: every label against what the fixture wrote."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from skimage.morphology import thin

from m3vit.data.pascal_context import (
    NORMALS_VALID_CLASSES, PART_GROUPS, VOC_CLASSES, PascalContextMT, context_edges, human_parts_label,
)
from m3vit.data.transforms import eval_transforms, train_transforms

H, W, IGNORE = 24, 32, 255  # the fixture trees' image size (tests/data/conftest.py)


def _image_reference(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0


def test_reads_every_label_as_written(pascal_tree):
    ds = PascalContextMT(pascal_tree.root, split="train")
    assert ds.ids == pascal_tree.ids["train"] and len(ds) == 2
    assert ds.tasks == ["semseg", "human_parts", "normals", "sal", "edge"]
    assert ds.task_channels == {"semseg": 21, "human_parts": 7, "normals": 3, "sal": 1, "edge": 1}
    assert ds.classes[0] == "background" and ds.classes[15] == "person" and len(ds.classes) == 21
    for index, image_id in enumerate(ds.ids):
        sample = ds[index]
        exp = pascal_tree.expected[image_id]
        image = sample["image"]
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        np.testing.assert_allclose(image.numpy(), _image_reference(f"{pascal_tree.root}/JPEGImages/{image_id}.jpg"),
                                   atol=1e-6)
        assert sample["semseg"].dtype == torch.int64
        np.testing.assert_array_equal(sample["semseg"].numpy(), exp["semseg"])
        assert sample["human_parts"].dtype == torch.int64
        np.testing.assert_array_equal(sample["human_parts"].numpy(), exp["human_parts"])
        assert sample["sal"].dtype == torch.float32 and sample["sal"].shape == (1, H, W)
        np.testing.assert_array_equal(sample["sal"].numpy(), exp["sal"])
        assert sample["normals"].dtype == torch.float32 and sample["normals"].shape == (3, H, W)
        np.testing.assert_allclose(sample["normals"].numpy(), exp["normals"], atol=1e-6)
        assert sample["edge"].shape == (1, H, W) and set(np.unique(sample["edge"].numpy())) <= {0.0, 1.0}
        assert sample["meta"] == {"dataset": "pascal_context", "split": "train", "index": index, "id": image_id,
                                  "size": (H, W)}


def test_normals_are_unit_where_valid_and_masked_by_class(pascal_tree, kit):
    ds = PascalContextMT(pascal_tree.root, split="train", tasks=["normals"])
    normals = ds[0]["normals"].numpy()
    label_map = pascal_tree.raw[ds.ids[0]]["label_map"]
    valid = (normals != IGNORE).all(0)
    assert ((normals == IGNORE).any(0) == ~valid).all()  # all three channels or none
    np.testing.assert_allclose(np.linalg.norm(normals[:, valid], axis=0), 1.0, atol=1e-6)
    assert not valid[label_map == kit.SKY].any()
    assert valid[label_map == kit.WALL].any() and valid[label_map == kit.PERSON].any()
    # without the class mask the sky normals come back
    unmasked = PascalContextMT(pascal_tree.root, split="train", tasks=["normals"], normals_valid_classes=None)
    assert (unmasked[0]["normals"].numpy() != IGNORE).all(0)[label_map == kit.SKY].any()


def test_reference_normals_class_list_facts():
    assert len(NORMALS_VALID_CLASSES) == 170 and len(set(NORMALS_VALID_CLASSES)) == 170
    assert {440, 284, 427, 158, 68} <= set(NORMALS_VALID_CLASSES)  # wall, person, tvmonitor, floor, ceiling
    assert not {360, 431, 189} & set(NORMALS_VALID_CLASSES)        # sky, unknown, ground


def _slow_boundaries(label_map: np.ndarray) -> np.ndarray:
    h, w = label_map.shape
    candidate = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and label_map[rr, cc] != label_map[r, c]:
                    candidate[r, c] = True
    return thin(candidate)


def test_edges_from_label_map(pascal_tree):
    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["edge"])
    edge = ds[0]["edge"].numpy()[0]
    expected = _slow_boundaries(pascal_tree.raw[ds.ids[0]]["label_map"])
    np.testing.assert_array_equal(edge, expected.astype(np.float32))


def test_edges_of_a_straight_boundary_are_one_pixel_wide():
    label_map = np.zeros((12, 16), np.int64)
    label_map[:, 7:] = 5
    edges = context_edges(label_map)
    # at most one pixel per row (thinning may shorten the line's ends by a pixel), all on the boundary
    assert (edges.sum(axis=1) <= 1).all() and edges.sum() >= 12 - 2
    assert edges[:, 6:8].sum() == edges.sum()
    assert not context_edges(np.full((5, 5), 3)).any()


@pytest.mark.parametrize("seed", range(3))
def test_edges_match_the_reference_laplacian_on_two_label_maps(seed):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    label_map = np.where(rng.random((20, 20)) < 0.3, 7, 2).astype(np.float64)
    reference = thin(np.abs(cv2.Laplacian(label_map, cv2.CV_64F)) > 0)
    np.testing.assert_array_equal(context_edges(label_map), reference)


def test_part_groups_are_the_six_reference_groups():
    expected = {1: {"hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"},
                2: {"torso", "neck"}, 3: {"luarm", "ruarm"}, 4: {"llarm", "rlarm", "lhand", "rhand"},
                5: {"luleg", "ruleg"}, 6: {"llleg", "rlleg", "lfoot", "rfoot"}}
    assert {g: {n for n, v in PART_GROUPS.items() if v == g} for g in range(1, 7)} == expected


def test_unknown_part_name_is_a_clear_error():
    mask = np.ones((2, 2), bool)
    with pytest.raises(ValueError, match="unknown person part 'tail'"):
        human_parts_label([(15, mask, [("tail", mask)])], (2, 2))


def test_person_without_parts_and_other_classes_give_background(tmp_path, kit):
    root = tmp_path / "P"
    kit.build_pascal(str(root))
    person = np.zeros((H, W), bool)
    person[5:10, 5:10] = True
    head = np.zeros((H, W), bool)
    head[5:7, 5:10] = True
    image_id = "2008_000001"
    kit.save_parts_mat(f"{root}/human_parts/{image_id}.mat", image_id,
                   [("person", 15, person, [("head", head)]), ("person", 15, ~person, [])])
    label = PascalContextMT(root, tasks=["human_parts"])[0]["human_parts"].numpy()
    assert (label[head] == 1).all() and (label[~head] == 0).all()


def test_only_the_requested_tasks_need_their_folders(pascal_tree):
    for folder in ("human_parts", "sal_distill", "pascal-context"):
        shutil.rmtree(os.path.join(pascal_tree.root, folder))
    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["semseg"])
    assert set(ds[0]) == {"image", "semseg", "meta"}
    assert ds.task_channels == {"semseg": 21}
    # normals without the class mask do not need the LabelMap folder; with it (the default) they do
    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["normals"], normals_valid_classes=None)
    assert set(ds[0]) == {"image", "normals", "meta"}
    with pytest.raises(FileNotFoundError, match="pascal-context/trainval"):
        PascalContextMT(pascal_tree.root, split="val", tasks=["normals"])
    with pytest.raises(FileNotFoundError, match="pascal-context/trainval"):
        PascalContextMT(pascal_tree.root, split="val", tasks=["edge"])


@pytest.mark.parametrize("folder, task", [
    ("JPEGImages", "semseg"), ("semseg", "semseg"), ("human_parts", "human_parts"),
    ("normals_distill", "normals"), ("sal_distill", "sal"), ("pascal-context", "edge"), ("pascal-context", "normals"),
])
def test_missing_folder_names_it_and_shows_the_tree(pascal_tree, folder, task):
    shutil.rmtree(os.path.join(pascal_tree.root, folder))
    with pytest.raises(FileNotFoundError) as info:
        PascalContextMT(pascal_tree.root, tasks=[task])
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert os.path.join(pascal_tree.root, folder) in first_line
    assert "JPEGImages/<id>.jpg" in message and "sal_distill/<id>.png" in message


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        PascalContextMT(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value).splitlines()[0]
    assert "ImageSets/Context" in str(info.value)


def test_missing_split_file(pascal_tree):
    os.remove(os.path.join(pascal_tree.root, "ImageSets/Context/val.txt"))
    with pytest.raises(FileNotFoundError, match="ImageSets/Context/val.txt"):
        PascalContextMT(pascal_tree.root, split="val")
    PascalContextMT(pascal_tree.root, split="train")  # the other split is fine


@pytest.mark.parametrize("rel", ["JPEGImages/2008_000002.jpg", "human_parts/2008_000001.mat",
                                 "sal_distill/2008_000002.png", "normals_distill/2008_000001.png",
                                 "pascal-context/trainval/2008_000002.mat"])
def test_missing_listed_file_names_it(pascal_tree, rel):
    os.remove(os.path.join(pascal_tree.root, rel))
    with pytest.raises(FileNotFoundError) as info:
        PascalContextMT(pascal_tree.root, split="train")
    assert os.path.join(pascal_tree.root, rel) in str(info.value).splitlines()[0]


def test_missing_semseg_names_both_candidates(pascal_tree):
    os.remove(os.path.join(pascal_tree.root, "semseg/pascal-context/2008_000001.png"))
    with pytest.raises(FileNotFoundError) as info:
        PascalContextMT(pascal_tree.root, split="train", tasks=["semseg"])
    line = str(info.value).splitlines()[0]
    assert "semseg/VOC12/2008_000001.png" in line and "semseg/pascal-context/2008_000001.png" in line


def test_bad_arguments(pascal_tree):
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val'\]"):
        PascalContextMT(pascal_tree.root, split="test")
    with pytest.raises(ValueError, match="depth"):
        PascalContextMT(pascal_tree.root, tasks=["depth"])
    with pytest.raises(ValueError, match="seed"):
        PascalContextMT(pascal_tree.root, seed=-1)


def test_semseg_value_out_of_range_is_a_clear_error(pascal_tree):
    bad = np.full((H, W), 30, np.uint8)
    Image.fromarray(bad).save(f"{pascal_tree.root}/semseg/pascal-context/2008_000003.png")
    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["semseg"])
    with pytest.raises(ValueError, match="label value 30"):
        ds[0]


def test_transform_gets_the_documented_rng(pascal_tree):
    draws = []

    def record(sample, rng):
        draws.append(rng.random())
        return sample

    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["sal"], transform=record, seed=7)
    ds[0]
    ds.set_epoch(3)
    ds[0]
    expected = [np.random.default_rng(np.random.SeedSequence([7, 1, 0, epoch, 1])).random() for epoch in (0, 3)]
    assert draws == expected


def test_train_transform_is_reproducible(pascal_tree):
    ds = PascalContextMT(pascal_tree.root, split="train", transform=train_transforms((20, 20)))
    a, b = ds[1], ds[1]
    for key in ds.tasks + ["image"]:
        assert torch.equal(a[key], b[key])
    ds.set_epoch(1)
    c = ds[1]
    assert any(not torch.equal(a[key], c[key]) for key in ds.tasks + ["image"])


def test_dataloader_collates_after_eval_transforms(pascal_tree):
    ds = PascalContextMT(pascal_tree.root, split="train", transform=eval_transforms((16, 20)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 20)
    assert batch["semseg"].shape == (2, 16, 20) and batch["semseg"].dtype == torch.int64
    assert batch["human_parts"].shape == (2, 16, 20)
    assert batch["normals"].shape == (2, 3, 16, 20)
    assert batch["sal"].shape == (2, 1, 16, 20) and batch["edge"].shape == (2, 1, 16, 20)
    assert batch["meta"]["id"] == ds.ids


def test_label_map_mat_without_labelmap_key(pascal_tree):
    scipy.io.savemat(f"{pascal_tree.root}/pascal-context/trainval/2008_000003.mat", {"Other": np.zeros((2, 2))})
    ds = PascalContextMT(pascal_tree.root, split="val", tasks=["edge"])
    with pytest.raises(ValueError, match="LabelMap"):
        ds[0]


def test_voc_classes():
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[20] == "tvmonitor" and len(VOC_CLASSES) == 21


@pytest.mark.parametrize("task, folder", [("edge", "pascal-context/trainval"), ("human_parts", "human_parts")])
@pytest.mark.parametrize("content", [b"MATLAB 5.0 MAT-file garbage", b"", bytes(range(256))])
def test_a_corrupt_mat_file_is_one_data_error_naming_it(pascal_tree, task, folder, content):
    from m3vit.utils.errors import DataError

    ds = PascalContextMT(pascal_tree.root, split="train", tasks=[task])
    path = f"{pascal_tree.root}/{folder}/{ds.ids[0]}.mat"
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(err.value).startswith(f"{path}: not a readable label file") and "\n" not in str(err.value)
