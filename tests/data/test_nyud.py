"""NYUDMT on a tiny NYUD_MT fixture tree: every label against what the fixture wrote."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from m3vit.data.nyud import NYUD_CLASSES, NYUDMT
from m3vit.data.transforms import eval_transforms, train_transforms

H, W, IGNORE = 24, 32, 255  # the fixture trees' image size (tests/data/conftest.py)


def _image_path(root: str, image_id: str) -> str:
    jpg = f"{root}/images/{image_id}.jpg"
    return jpg if os.path.exists(jpg) else f"{root}/images/{image_id}.png"


@pytest.mark.parametrize("split", ["train", "val"])
def test_reads_every_label_as_written(nyud_tree, split):
    ds = NYUDMT(nyud_tree.root, split=split)
    assert ds.ids == nyud_tree.ids[split]
    assert ds.tasks == ["semseg", "depth", "normals", "edge"]
    assert ds.task_channels == {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
    for index, image_id in enumerate(ds.ids):
        sample = ds[index]
        exp = nyud_tree.expected[image_id]
        reference = np.asarray(Image.open(_image_path(nyud_tree.root, image_id)).convert("RGB"), np.float64) / 255
        np.testing.assert_allclose(sample["image"].numpy(), reference.transpose(2, 0, 1), atol=1e-6)
        assert sample["semseg"].dtype == torch.int64
        np.testing.assert_array_equal(sample["semseg"].numpy(), exp["semseg"])
        assert sample["semseg"][0, 0] == IGNORE and sample["semseg"][0, 1] == 0 and sample["semseg"][0, 2] == 39
        assert sample["depth"].dtype == torch.float32 and sample["depth"].shape == (1, H, W)
        np.testing.assert_array_equal(sample["depth"].numpy(), exp["depth"])
        assert sample["normals"].dtype == torch.float32 and sample["normals"].shape == (3, H, W)
        np.testing.assert_allclose(sample["normals"].numpy(), exp["normals"], atol=1e-6)
        np.testing.assert_array_equal(sample["edge"].numpy(), exp["edge"])
        assert sample["meta"] == {"dataset": "nyud", "split": split, "index": index, "id": image_id, "size": (H, W)}


def test_normals_unit_where_valid_and_ignored_in_all_channels(nyud_tree):
    ds = NYUDMT(nyud_tree.root, split="train", tasks=["normals"])
    for index in range(len(ds)):
        normals = ds[index]["normals"].numpy()
        ignored = normals == IGNORE
        assert (ignored.any(0) == ignored.all(0)).all()
        assert ignored.all(0).any()  # the fixture wrote zero vectors / black pixels
        np.testing.assert_allclose(np.linalg.norm(normals[:, ~ignored.all(0)], axis=0), 1.0, atol=1e-6)


def test_classes():
    assert len(NYUD_CLASSES) == 40 and len(set(NYUD_CLASSES)) == 40
    assert NYUD_CLASSES[:3] == ("wall", "floor", "cabinet") and NYUD_CLASSES[-1] == "otherprop"
    assert NYUD_CLASSES[23] == "refrigerator" and NYUD_CLASSES[30] == "person"


def test_task_subset_needs_only_its_folders(nyud_tree):
    for folder in ("depth", "normals", "edge"):
        shutil.rmtree(os.path.join(nyud_tree.root, folder))
    ds = NYUDMT(nyud_tree.root, split="val", tasks=["semseg"])
    assert set(ds[0]) == {"image", "semseg", "meta"} and ds.task_channels == {"semseg": 40}


@pytest.mark.parametrize("folder, task", [("images", "depth"), ("segmentation", "semseg"), ("depth", "depth"),
                                          ("normals", "normals"), ("edge", "edge")])
def test_missing_folder_names_it_and_shows_the_tree(nyud_tree, folder, task):
    shutil.rmtree(os.path.join(nyud_tree.root, folder))
    with pytest.raises(FileNotFoundError) as info:
        NYUDMT(nyud_tree.root, tasks=[task])
    assert os.path.join(nyud_tree.root, folder) in str(info.value).splitlines()[0]
    assert "gt_sets/{train,val}.txt" in str(info.value)


def test_missing_root_and_split_file(nyud_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="NYUD_MT root folder not found"):
        NYUDMT(tmp_path / "absent")
    os.remove(os.path.join(nyud_tree.root, "gt_sets/train.txt"))
    with pytest.raises(FileNotFoundError, match="gt_sets/train.txt"):
        NYUDMT(nyud_tree.root, split="train")


@pytest.mark.parametrize("rel, split", [("images/0002.jpg", "train"), ("images/0003.png", "val"),
                                        ("depth/0001.npy", "train"), ("normals/0002.png", "train"),
                                        ("edge/0003.png", "val"), ("segmentation/0001.png", "train")])
def test_missing_listed_file_names_it(nyud_tree, rel, split):
    os.remove(os.path.join(nyud_tree.root, rel))
    with pytest.raises(FileNotFoundError) as info:
        NYUDMT(nyud_tree.root, split=split)
    assert os.path.join(nyud_tree.root, os.path.splitext(rel)[0]) in str(info.value).splitlines()[0]


def test_many_missing_files_give_one_error_with_a_count(nyud_tree):
    shutil.rmtree(os.path.join(nyud_tree.root, "depth"))
    os.makedirs(os.path.join(nyud_tree.root, "depth"))
    with pytest.raises(FileNotFoundError, match=r"^NYUD_MT: 2 file\(s\)"):
        NYUDMT(nyud_tree.root, split="train", tasks=["depth"])


def test_bad_split_and_task(nyud_tree):
    with pytest.raises(ValueError, match=r"\['train', 'val'\]"):
        NYUDMT(nyud_tree.root, split="trainval")
    with pytest.raises(ValueError, match="human_parts"):
        NYUDMT(nyud_tree.root, tasks=["human_parts"])


def test_bad_values_are_clear_errors(nyud_tree):
    Image.fromarray(np.full((H, W), 41, np.uint8)).save(f"{nyud_tree.root}/segmentation/0003.png")
    np.save(f"{nyud_tree.root}/normals/0003.npy", np.zeros((3, H, W), np.float32))
    ds = NYUDMT(nyud_tree.root, split="val")
    with pytest.raises(ValueError, match="label value 41"):
        ds[0]
    ds = NYUDMT(nyud_tree.root, split="val", tasks=["normals"])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        ds[0]


def test_depth_scaled_by_the_zoom_and_reproducible(nyud_tree):
    ds = NYUDMT(nyud_tree.root, split="train", tasks=["depth", "semseg"], seed=3,
                transform=train_transforms((H, W), flip=False, degrees=(0, 0), scales=(2.0, 2.0)))
    out, again = ds[0], ds[0]
    assert torch.equal(out["depth"], again["depth"]) and torch.equal(out["image"], again["image"])
    raw = NYUDMT(nyud_tree.root, split="train", tasks=["depth"])[0]["depth"]
    valid_in, valid_out = raw != IGNORE, out["depth"] != IGNORE
    # a 2x zoom of an even-sized map about its centre copies each source pixel into a 2x2 block
    centre = raw[:, H // 4: 3 * H // 4, W // 4: 3 * W // 4]
    expected = centre.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    expected = torch.where(expected != IGNORE, expected / 2, expected)
    torch.testing.assert_close(out["depth"], expected)
    assert valid_in.any() and valid_out.any()


def test_dataloader_collates_after_eval_transforms(nyud_tree):
    ds = NYUDMT(nyud_tree.root, split="train", transform=eval_transforms((12, 16)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 3, 12, 16)
    assert batch["semseg"].shape == (2, 12, 16) and batch["depth"].shape == (2, 1, 12, 16)
    assert batch["normals"].shape == (2, 3, 12, 16) and batch["edge"].shape == (2, 1, 12, 16)
    assert list(batch["meta"]["id"]) == ds.ids and batch["meta"]["index"].tolist() == [0, 1]


def test_errors_are_m3vit_errors_naming_the_file(nyud_tree):
    from m3vit.utils.errors import ConfigError, DataError

    with pytest.raises(ConfigError):
        NYUDMT(nyud_tree.root, split="trainval")
    with pytest.raises(ConfigError):
        NYUDMT(nyud_tree.root, tasks=["human_parts"])
    Image.fromarray(np.full((H, W), 41, np.uint8)).save(f"{nyud_tree.root}/segmentation/0003.png")
    with pytest.raises(DataError, match="0003.png: label value 41"):
        NYUDMT(nyud_tree.root, split="val")[0]
    # corrupt label files: one DataError naming the file, not a decoder's message
    corrupt = {"segmentation/0003.png": ["semseg"], "depth/0003.npy": ["depth"]}
    for rel, tasks in corrupt.items():
        path = f"{nyud_tree.root}/{rel}"
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n garbage" if rel.endswith(".png") else b"\x93NUMPY garbage")
        with pytest.raises(DataError) as err:
            NYUDMT(nyud_tree.root, split="val", tasks=tasks)[0]
        assert str(err.value).startswith(f"{path}: not a readable label file") and "\n" not in str(err.value)
    # a 16-bit image is read by its real values, like inference reads it
    image = np.random.default_rng(0).integers(0, 65536, (H, W), dtype=np.uint16)
    os.remove(_image_path(nyud_tree.root, "0003"))
    Image.fromarray(image).save(f"{nyud_tree.root}/images/0003.png")
    sample = NYUDMT(nyud_tree.root, split="val", tasks=["edge"])[0]
    np.testing.assert_allclose(sample["image"][1].numpy(), image / 65535, atol=1e-7)


def test_a_split_file_that_is_not_text_names_the_file(nyud_tree):
    from m3vit.utils.errors import DataError

    path = f"{nyud_tree.root}/gt_sets/val.txt"
    with open(path, "wb") as f:
        f.write(bytes(range(128, 256)))
    with pytest.raises(DataError) as err:
        NYUDMT(nyud_tree.root, split="val")
    assert str(err.value) == f"split file {path} is not UTF-8 text (one image id per line expected)"
