"""Inference on image files: PNG per image x task at the image's size, raw arrays, corrupt files,
name collisions, input sizes and unknown tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from m3vit.engine.builders import build_tasks
from m3vit.engine.inference import (
    ImageReadError,
    infer_files,
    output_stems,
    predict,
    predict_checked,
    read_image,
    upsample_rows,
)
from m3vit.models import create_model
from m3vit.utils.errors import InputError

TASKS = {"semseg": 8, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1, "depth": 1}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("m3vit_micro", TASKS, img_size=(32, 32), embed_dim=32, depth=2, num_heads=2,
                        moe_blocks=[1], num_experts=4, top_k=2, head_channels=8).eval()


@pytest.fixture
def images(tmp_path):
    """Three readable images of different sizes and modes: RGB PNG, greyscale JPEG, RGBA PNG."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = {
        "rgb": (folder / "room.png", Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))),
        "grey": (folder / "grey.jpg", Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8))),
        "rgba": (folder / "alpha.png", Image.fromarray(rng.integers(0, 256, (33, 17, 4), dtype=np.uint8), "RGBA")),
    }
    for path, img in paths.values():
        img.save(path)
    return {k: p for k, (p, _) in paths.items()}


def _manual_prediction(model, image: torch.Tensor, task: str) -> torch.Tensor:
    """Reference: bilinear resize to 32x32 (antialiased when a side shrinks, as the training ``Resize``),
    ImageNet normalisation by hand, the task alone, back to size."""
    shrinking = image.shape[-2] > 32 or image.shape[-1] > 32
    x = F.interpolate(image[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=shrinking)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x, tasks=[task])[task]
    return F.interpolate(out, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]


def test_read_image_gives_rgb_in_unit_range(images):
    rgb = read_image(images["rgb"])
    assert rgb.shape == (3, 50, 70) and rgb.dtype == torch.float32
    expected = np.asarray(Image.open(images["rgb"]), dtype=np.float32) / 255
    assert np.allclose(rgb.permute(1, 2, 0).numpy(), expected)
    grey = read_image(images["grey"])
    assert grey.shape == (3, 20, 30) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert read_image(images["rgba"]).shape == (3, 33, 17)


def _predict_one(model, image, tasks=None, **kwargs):
    """``predict`` of one image, outputs at the image's own size, ``{task: [C, H, W]}``."""
    return {t: p[0] for t, p in predict(model, [image], tasks, out_size=image.shape[-2:], **kwargs).items()}


def test_predict_runs_only_the_requested_pathway_at_the_image_size(model, images):
    for key in ("rgb", "grey", "rgba"):  # shrinking, enlarging, one side each
        image = read_image(images[key])
        preds = _predict_one(model, image, ["semseg", "normals"])
        assert set(preds) == {"semseg", "normals"}
        assert preds["semseg"].shape == (8, *image.shape[-2:]) and preds["normals"].shape == (3, *image.shape[-2:])
        for task in preds:
            torch.testing.assert_close(preds[task], _manual_prediction(model, image, task), atol=1e-5, rtol=1e-5)


def test_predict_batches_pathways_and_output_sizes(model, images):
    image = read_image(images["rgb"])
    grey = read_image(images["grey"])
    single = predict(model, [image, grey], ["sal", "depth"])
    together = predict(model, [image, grey], ["sal", "depth"], pathway="all")
    for task in ("sal", "depth"):
        assert single[task].shape == (2, 1, 32, 32) and single[task].dtype == torch.float32  # network size
        torch.testing.assert_close(single[task], together[task], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single[task][1], predict(model, [grey], [task])[task][0], atol=1e-5, rtol=1e-5)
    assert predict(model, torch.stack([image, image]), ["sal"], out_size=(7, 9))["sal"].shape == (2, 1, 7, 9)
    seen = []
    predict(model, [image], ["sal", "edge"], after_task=seen.append)
    assert seen == ["sal", "edge"]
    with pytest.raises(ValueError, match="pathway"):
        predict(model, [image], ["sal"], pathway="some")
    with pytest.raises(InputError, match="wrap it in a list"):
        predict(model, image, ["sal"])
    with pytest.raises(InputError, match=r"unknown task\(s\) \['bogus'\]"):
        predict(model, [image], ["bogus"])
    with pytest.raises(InputError, match="not divisible by the patch size"):
        predict(model, [image], ["sal"], size=(30, 32))


def test_infer_validates_once_and_resizes_each_image_once(model, images, tmp_path, monkeypatch):
    """The task names are checked at infer_files' entry (the model checks its own forward); each image is
    resized for the network once, each raw output once to the image size."""
    import m3vit.data.transforms as transforms
    import m3vit.engine.inference as inference

    calls = {"resolve": 0, "resize_image": 0, "resize_bilinear": 0, "upsample_rows": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(model, "resolve_tasks", counted("resolve", model.resolve_tasks))
    monkeypatch.setattr(transforms, "resize_image", counted("resize_image", transforms.resize_image))
    monkeypatch.setattr(inference, "resize_bilinear", counted("resize_bilinear", inference.resize_bilinear))
    monkeypatch.setattr(inference, "_STRIP_PIXELS", 1 << 30)  # one strip per output
    monkeypatch.setattr(inference, "upsample_rows", counted("upsample_rows", inference.upsample_rows))
    tasks = ["semseg", "depth"]  # semseg coloured pointwise (in strips), depth as a whole map
    infer_files(model, [images["rgb"], images["grey"]], tasks, tmp_path / "out")
    forwards = 2  # one forward of every task per image: the model's own check of its input
    assert calls == {"resolve": 1 + forwards, "resize_image": 2, "resize_bilinear": 2, "upsample_rows": 2}
    calls.update(resolve=0)
    predict_checked(model, [read_image(images["rgb"])], tasks, (32, 32))
    assert calls["resolve"] == len(tasks)  # predict_checked trusts its caller


def test_infer_writes_a_png_per_image_and_task_at_the_original_size(model, images, tmp_path):
    out = tmp_path / "out"
    tasks = ["semseg", "sal", "depth"]
    result = infer_files(model, list(images.values()), tasks, out)
    assert result.failed == []
    expected_sizes = {"room": (70, 50), "grey": (30, 20), "alpha": (17, 33)}  # PIL sizes are (W, H)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}_{t}.png" for s in expected_sizes for t in tasks]
                                                           + [".m3vit-output.json"])  # + the manifest
    assert sorted(result.written) == sorted(p for p in out.iterdir() if not p.name.startswith("."))
    task_objs = build_tasks({t: TASKS[t] for t in tasks})
    for stem, size in expected_sizes.items():
        image = read_image(next(p for p in images.values() if p.stem == stem))
        for task in tasks:
            png = Image.open(out / f"{stem}_{task}.png")
            assert png.size == size and png.mode == "RGB"
            # the picture is the task's colouring of the upsampled prediction
            reference = task_objs[task].colorize(_manual_prediction(model, image, task), kind="pred")
            diff = np.abs(np.asarray(png, dtype=int) - reference.astype(int))
            assert (diff > 1).mean() < 0.01  # identical up to argmax ties / rounding at a few pixels


def test_npy_holds_the_documented_arrays(model, images, tmp_path):
    out = tmp_path / "out"
    infer_files(model, [images["rgb"]], list(TASKS), out, save_npy=True)
    image = read_image(images["rgb"])
    arrays = {t: np.load(out / f"room_{t}.npy") for t in TASKS}
    ref = {t: _manual_prediction(model, image, t) for t in TASKS}
    for task in ("semseg", "human_parts"):
        assert arrays[task].dtype == np.uint8 and arrays[task].shape == (50, 70)
        assert (arrays[task] == ref[task].argmax(0).numpy()).mean() > 0.99
    for task in ("sal", "edge"):
        assert arrays[task].dtype == np.float32 and arrays[task].shape == (50, 70)
        assert np.allclose(arrays[task], torch.sigmoid(ref[task][0]).numpy(), atol=1e-5)
        assert arrays[task].min() >= 0 and arrays[task].max() <= 1
    assert arrays["normals"].shape == (3, 50, 70) and arrays["normals"].dtype == np.float32
    assert np.allclose(np.linalg.norm(arrays["normals"], axis=0), 1, atol=1e-5)
    assert np.allclose(arrays["normals"], (ref["normals"] / ref["normals"].norm(dim=0)).numpy(), atol=1e-4)
    assert arrays["depth"].shape == (50, 70) and np.allclose(arrays["depth"], ref["depth"][0].numpy(), atol=1e-5)


def test_decode_per_task_kind():
    tasks = build_tasks(TASKS)
    logits = torch.zeros(8, 2, 2)
    logits[5, 0, 1] = 1.0
    assert tasks["semseg"].decode(logits).tolist() == [[0, 5], [0, 0]]
    assert tasks["sal"].decode(torch.zeros(1, 2, 2)).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    normals = tasks["normals"].decode(torch.tensor([3.0, 0.0, 4.0]).view(3, 1, 1).expand(3, 2, 2))
    assert np.allclose(normals[:, 0, 0], [0.6, 0.0, 0.8])
    assert tasks["depth"].decode(torch.full((1, 2, 3), 2.5)).shape == (2, 3)


def test_a_corrupt_file_is_reported_and_the_others_are_written(model, images, tmp_path):
    corrupt = tmp_path / "in" / "x.png"
    corrupt.write_bytes(b"\x89PNG this is not really a png" + bytes(range(256)))
    missing = tmp_path / "in" / "gone.png"
    truncated = tmp_path / "in" / "cut.png"
    truncated.write_bytes(images["rgb"].read_bytes()[:200])
    out = tmp_path / "out"
    paths = [images["rgb"], corrupt, missing, truncated, images["grey"]]
    result = infer_files(model, paths, ["edge"], out)
    assert [p for p, _ in result.failed] == [corrupt, missing, truncated]
    assert result.processed == [images["rgb"], images["grey"]]
    for path, reason in result.failed:
        assert str(path) in reason and "\n" not in reason
    assert sorted(p.name for p in out.iterdir()) == [".m3vit-output.json", "grey_edge.png", "room_edge.png"]
    assert [p.name for p in out.glob(".*")] == [".m3vit-output.json"]  # no temporary files left behind


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        assert str(err.value).startswith(str(path))


def test_same_stem_in_two_folders_is_refused_before_writing(model, tmp_path, images):
    other = tmp_path / "other"
    other.mkdir()
    clash = other / "room.jpg"
    Image.new("RGB", (8, 8)).save(clash)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="would write the same output files"):
        infer_files(model, [images["rgb"], clash], ["sal"], out)
    assert not out.exists()
    # the same file named twice (even by another spelling) is processed once
    again = images["rgb"].parent / ".." / "in" / "room.png"
    assert list(output_stems([images["rgb"], again]).values()) == ["room"]
    result = infer_files(model, [images["rgb"], again], ["sal"], out)
    assert [p.name for p in result.written] == ["room_sal.png"]


def test_input_size(model, images, tmp_path):
    out = tmp_path / "out"
    result = infer_files(model, [images["rgb"]], ["depth"], out, size=(48, 64), save_npy=True)
    assert not result.failed and np.load(out / "room_depth.npy").shape == (50, 70)
    # another input size gives another prediction (the network really saw 48x64)
    default = _predict_one(model, read_image(images["rgb"]), ["depth"])["depth"][0].numpy()
    assert not np.allclose(np.load(out / "room_depth.npy"), default)
    for size, message in [((30, 32), "size 30x32 is not divisible by the patch size 16"),
                          ((32, 0), "size 32x0 must be positive")]:
        with pytest.raises(InputError, match=message):
            infer_files(model, [images["rgb"]], ["depth"], out, size=size)


def test_unknown_task_lists_the_models_tasks(model, images, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['bogus'\]; this model's tasks are \['semseg'"):
        infer_files(model, [images["rgb"]], ["bogus"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Large images: strips of rows instead of the whole upsampled output
# ----------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 4), low=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       high=st.tuples(st.integers(1, 40), st.integers(1, 40)), cut=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_upsample_rows_equals_a_slice_of_the_whole_interpolation(channels, low, high, cut, seed):
    pred = torch.randn(channels, *low, generator=torch.Generator().manual_seed(seed))
    whole = F.interpolate(pred[None], size=high, mode="bilinear", align_corners=False)[0]
    start = min(cut, high[0] - 1)
    for begin, end in ((0, start), (start, high[0])):
        if begin < end:
            rows = upsample_rows(pred, high, begin, end)
            torch.testing.assert_close(rows, whole[:, begin:end], rtol=1e-5, atol=1e-5)


def test_strips_give_the_same_files_as_one_piece(model, tmp_path, monkeypatch):
    """infer_files draws pointwise-coloured tasks strip by strip: the files match predict() + colorize."""
    import m3vit.engine.inference as inference

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(inference, "_STRIP_PIXELS", 53 * 5)  # 5 rows per strip: 8 strips
    infer_files(model, [path], list(TASKS), tmp_path / "out", save_npy=True)
    preds = _predict_one(model, read_image(path))
    task_objs = build_tasks(TASKS)
    for task in TASKS:
        picture = np.asarray(Image.open(tmp_path / "out" / f"wide_{task}.png"), dtype=int)
        reference = task_objs[task].colorize(preds[task], kind="pred").astype(int)
        assert (np.abs(picture - reference) > 1).mean() < 0.005, task
        array = np.load(tmp_path / "out" / f"wide_{task}.npy")
        expected = task_objs[task].decode(preds[task])
        assert array.shape == expected.shape and array.dtype == expected.dtype
        if array.dtype == np.uint8:
            assert (array == expected).mean() > 0.995
        else:
            np.testing.assert_allclose(array, expected, rtol=1e-4, atol=1e-5)


def test_a_sixteen_bit_image_predicts_like_its_eight_bit_twin(model, tmp_path):
    values = np.random.default_rng(4).integers(0, 256, (30, 40), dtype=np.uint16)
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "a8.png")
    Image.fromarray(values * 257).save(tmp_path / "a16.png")  # the same picture at 16 bits
    eight, sixteen = (_predict_one(model, read_image(tmp_path / n), ["sal"])["sal"] for n in ("a8.png", "a16.png"))
    torch.testing.assert_close(eight, sixteen, rtol=1e-5, atol=1e-5)


def test_infer_skips_an_image_above_max_pixels(model, images, tmp_path, huge_png):
    result = infer_files(model, [huge_png, images["rgb"]], ["sal"], tmp_path / "out")
    assert [p for p, _ in result.failed] == [huge_png] and result.processed == [images["rgb"]]
    assert "13000x13000" in result.failed[0][1]
    result = infer_files(model, [images["rgb"]], ["sal"], tmp_path / "out", max_pixels=50 * 70 - 1)
    assert [p for p, _ in result.failed] == [images["rgb"]] and "above the limit" in result.failed[0][1]
