"""``build_dataset`` and ``dataset_from_config``: names, defaults, what a config section builds, the errors."""

from types import SimpleNamespace

import pytest
import torch

from m3vit.data import (DATASETS, NYUDMT, DataSettings, Normalize, PadCrop, RandomHorizontalFlip, RandomScaleRotate,
                        Resize, SyntheticScenes, build_dataset, dataset_from_config)
from m3vit.engine.config import DataSection
from m3vit.utils.errors import ConfigError


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


# --- from a run config's data section ------------------------------------------------------------------

def _section(**fields) -> SimpleNamespace:
    """A ``data`` section as a plain object: ``dataset_from_config`` reads fields, not a class."""
    defaults = dict(name="synthetic", root=None, size=(32, 48), seed=3, tasks=["semseg", "depth"], train_length=5,
                    val_length=2, augment="crop", scale_rotate="pascal", people=None)
    return SimpleNamespace(**{**defaults, **fields})


def test_the_engine_data_section_is_data_settings():
    assert isinstance(DataSection(), DataSettings) and isinstance(_section(), DataSettings)
    assert not isinstance(SimpleNamespace(name="synthetic"), DataSettings)


def test_synthetic_from_config_lengths_and_transforms():
    train = dataset_from_config(_section(), "train", train=True)
    evaluation = dataset_from_config(_section(), "val", train=False)
    assert isinstance(train, SyntheticScenes) and len(train) == 5 and len(evaluation) == 2
    assert [type(t) for t in train.transform.transforms] == [RandomHorizontalFlip, RandomScaleRotate, PadCrop, Normalize]
    assert evaluation.transform is None and evaluation.size == (32, 48) and evaluation.tasks == ("semseg", "depth")
    plain = dataset_from_config(_section(augment="none", people="close"), "train", train=True)
    assert [type(t) for t in plain.transform.transforms] == [Normalize] and plain.people == "close"
    # the same scenes as the dataset built by hand, normalised
    by_hand = SyntheticScenes("train", size=(32, 48), length=5, seed=3, tasks=["semseg", "depth"], people="close")
    assert torch.equal(plain[4]["image"], Normalize()(by_hand[4], None)["image"])


def test_folder_dataset_from_config(nyud_tree):
    reference = _section(name="nyud", root=str(nyud_tree.root), tasks=None, scale_rotate="reference", augment="resize")
    train = dataset_from_config(reference, "train", train=True)
    assert isinstance(train, NYUDMT) and len(train) == len(nyud_tree.ids["train"])
    (warp,) = [t for t in train.transform.transforms if isinstance(t, RandomScaleRotate)]
    assert warp.scale_choices == NYUDMT.REFERENCE_SCALE_ROTATE["scale_choices"]
    assert train[0]["image"].shape == (3, 32, 48)
    plain = dataset_from_config(_section(name="nyud", root=str(nyud_tree.root), augment="none"), "train", train=True)
    assert [type(t) for t in plain.transform.transforms] == [Resize, Normalize]
    evaluation = dataset_from_config(reference, "val", train=False)
    assert evaluation.transform is None and len(evaluation) == len(nyud_tree.ids["val"])


@pytest.mark.parametrize("fields, message", [
    ({"name": "coco"}, "unknown dataset 'coco'"),
    ({"name": "nyud"}, "needs its root folder"),
    ({"root": "/data"}, "rendered, not read"),
    ({"name": "nyud", "root": "/data", "people": "close"}, "synthetic dataset only"),
])
def test_from_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        dataset_from_config(_section(**fields), "train", train=True)
