"""``build_dataset``: names, defaults and the errors it gives."""

import pytest
import torch

from m3vit.data import DATASETS, NYUDMT, SyntheticScenes, build_dataset


def test_synthetic_by_name_with_size_and_length():
    data = build_dataset("synthetic", "val", size=(32, 40), length=3, seed=5, tasks=["depth"])
    assert isinstance(data, SyntheticScenes) and len(data) == 3 and data.tasks == ("depth",)
    sample = data[2]
    assert sample["image"].shape == (3, 32, 40) and set(sample) == {"image", "depth", "meta"}
    again = SyntheticScenes("val", size=(32, 40), length=3, seed=5, tasks=["depth"])[2]
    assert torch.equal(sample["image"], again["image"])


def test_synthetic_people_mode_by_name():
    close = build_dataset("synthetic", "val", size=(16, 16), length=2, people="close")
    assert close.people == "close" and build_dataset("synthetic", "val", size=(16, 16), length=2).people == "sparse"


def test_folder_dataset_resized_when_size_given(nyud_tree):
    data = build_dataset("nyud", "train", root=str(nyud_tree.root), size=(16, 20))
    assert isinstance(data, NYUDMT)
    sample = data[0]
    assert sample["image"].shape == (3, 16, 20) and sample["semseg"].shape == (16, 20)
    assert sample["image"].min() >= 0 and sample["image"].max() <= 1  # resized, not normalised


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("coco", {}, "unknown dataset 'coco'"),
        ("nyud", {}, "needs its root folder"),
        ("synthetic", {"root": "/data"}, "rendered, not read"),
        ("nyud", {"root": "/data", "length": 3}, "fixed length"),
        ("nyud", {"root": "/data", "people": "close"}, "synthetic dataset only"),
        ("synthetic", {"people": "crowd"}, "unknown people mode 'crowd'; allowed: sparse, close"),
        ("synthetic", {"size": (0, 8)}, "size"),  # each dataset / transform validates its own size
    ],
)
def test_bad_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_dataset(name, **kwargs)


def test_registry_names():
    assert sorted(DATASETS) == ["nyud", "pascal_context", "synthetic"]
