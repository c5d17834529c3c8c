"""Joint transforms keep every label consistent with the image: geometry, values, ignore padding, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, PadCrop, RandomHorizontalFlip, RandomScaleRotate, Resize,
    eval_transforms, preprocess, resize_image, train_transforms,
)
from m3vit.utils.errors import InputError
from m3vit.tasks import get_task

IGNORE = 255
CLASS_TASKS = ("semseg", "human_parts")
FAST = settings(max_examples=25, deadline=None)


def random_sample(seed: int, h: int, w: int, ignore_fraction: float = 0.1) -> dict:
    """A sample with all six labels in the base.py format (some ignored pixels) and a meta dict."""
    g = np.random.default_rng(seed)
    ignored = g.random((h, w)) < ignore_fraction
    normals = g.normal(size=(3, h, w))
    normals /= np.linalg.norm(normals, axis=0, keepdims=True)
    normals[:, ignored] = IGNORE
    depth = g.uniform(0.5, 8.0, (1, h, w))
    depth[:, ignored] = IGNORE
    semseg = g.integers(0, 21, (h, w))
    semseg[ignored] = IGNORE
    return {
        "image": torch.from_numpy(g.random((3, h, w))).float(),
        "semseg": torch.from_numpy(semseg),
        "human_parts": torch.from_numpy(g.integers(0, 7, (h, w))),
        "sal": torch.from_numpy((g.random((1, h, w)) < 0.5).astype(np.float32)),
        "edge": torch.from_numpy((g.random((1, h, w)) < 0.2).astype(np.float32)),
        "normals": torch.from_numpy(normals).float(),
        "depth": torch.from_numpy(depth).float(),
        "meta": {"id": "x", "size": (h, w)},
    }


def sphere(size: int, radius: float) -> torch.Tensor:
    """Normals of a sphere centred in a ``size`` x ``size`` frame (x right, y up = -row), 255 outside."""
    c = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = (cols - c) / radius, -(rows - c) / radius
    inside = x**2 + y**2 < 1
    n = np.stack([x, y, np.sqrt(np.clip(1 - x**2 - y**2, 0, None))])
    n[:, ~inside] = IGNORE
    return torch.from_numpy(n).float()


def sphere_radius_mask(size: int, radius: float, limit: float) -> np.ndarray:
    c = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    return ((cols - c) ** 2 + (rows - c) ** 2) < (limit * radius) ** 2


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def valid(normals: torch.Tensor) -> torch.Tensor:
    return (normals != IGNORE).all(0)


# --- horizontal flip -------------------------------------------------------------------------------

@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 9), w=st.integers(1, 9))
def test_flip_twice_is_identity(seed, h, w):
    sample = random_sample(seed, h, w)
    flip = RandomHorizontalFlip(p=1.0)
    twice = flip(flip(sample, rng()), rng())
    for key, value in sample.items():
        if key == "meta":
            assert twice[key] is value
        else:
            assert torch.equal(twice[key], value), key


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 7), w=st.integers(1, 7))
def test_flip_moves_pixels_and_negates_normal_x(seed, h, w):
    sample = random_sample(seed, h, w)
    out = RandomHorizontalFlip(p=1.0)(sample, rng())
    for r in range(h):
        for c in range(w):
            src = w - 1 - c
            for key in ("semseg", "human_parts"):
                assert out[key][r, c] == sample[key][r, src]
            for key in ("image", "sal", "edge", "depth"):
                assert torch.equal(out[key][:, r, c], sample[key][:, r, src])
            n = sample["normals"][:, r, src]
            expected = n if (n == IGNORE).all() else torch.stack([-n[0], n[1], n[2]])
            assert torch.equal(out["normals"][:, r, c], expected)


def test_flip_probability_zero_and_one():
    sample = random_sample(0, 4, 5)
    assert RandomHorizontalFlip(p=0.0)(sample, rng()) is sample
    flips = [not torch.equal(RandomHorizontalFlip(0.5)(sample, rng(s))["image"], sample["image"]) for s in range(200)]
    assert 60 < sum(flips) < 140


def test_sphere_is_unchanged_by_flip_with_x_negated():
    n = sphere(41, 18)
    out = RandomHorizontalFlip(p=1.0)({"image": torch.zeros(3, 41, 41), "normals": n}, rng())["normals"]
    torch.testing.assert_close(out, n, atol=1e-6, rtol=0)


# --- scale and rotation ----------------------------------------------------------------------------

def fixed_warp(scale: float, angle: float, scale_depth: bool = True) -> RandomScaleRotate:
    return RandomScaleRotate(scales=(scale, scale), degrees=(angle, angle), scale_depth=scale_depth)


def slow_source(r: int, c: int, h: int, w: int, scale: float, angle: float) -> tuple[float, float]:
    """Source (row, col) of output pixel (r, c), derived in y-up coordinates (X right, Y up).

    The content moves by X' = s (X cos a - Y sin a), Y' = s (X sin a + Y cos a); invert that.
    """
    cy, cx = (h - 1) / 2, (w - 1) / 2
    x_out, y_out = c - cx, -(r - cy)
    a = math.radians(angle)
    x_in = (x_out * math.cos(a) + y_out * math.sin(a)) / scale
    y_in = (-x_out * math.sin(a) + y_out * math.cos(a)) / scale
    return cy - y_in, cx + x_in


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(2, 9), w=st.integers(2, 9),
       scale=st.floats(0.5, 2.0), angle=st.floats(-180, 180))
def test_warp_matches_slow_reference(seed, h, w, scale, angle):
    sample = random_sample(seed, h, w, ignore_fraction=0.0)
    out = fixed_warp(scale, angle, scale_depth=False)(sample, rng())
    image = sample["image"].double().numpy()
    a = math.radians(angle)
    for r in range(h):
        for c in range(w):
            sr, sc = slow_source(r, c, h, w, scale, angle)
            # bilinear with zeros outside, pixel centres at integer positions
            r0, c0 = math.floor(sr), math.floor(sc)
            value = np.zeros(3)
            for rr, wr in ((r0, 1 - (sr - r0)), (r0 + 1, sr - r0)):
                for cc, wc in ((c0, 1 - (sc - c0)), (c0 + 1, sc - c0)):
                    if 0 <= rr < h and 0 <= cc < w:
                        value += wr * wc * image[:, rr, cc]
            np.testing.assert_allclose(out["image"][:, r, c].numpy(), value, atol=1e-4)
            # nearest for labels; a source exactly half-way between pixels may round either way
            if abs((sr % 1) - 0.5) < 1e-6 or abs((sc % 1) - 0.5) < 1e-6:
                continue
            nr, nc = math.floor(sr + 0.5), math.floor(sc + 0.5)
            inside = 0 <= nr < h and 0 <= nc < w
            for key in CLASS_TASKS:
                assert out[key][r, c] == (sample[key][nr, nc] if inside else IGNORE), key
            for key in ("sal", "edge", "depth"):
                assert out[key][0, r, c] == (sample[key][0, nr, nc] if inside else IGNORE), key
            if inside:
                x, y, z = sample["normals"][:, nr, nc].double().tolist()
                expected = [x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a), z]
                np.testing.assert_allclose(out["normals"][:, r, c].numpy(), expected, atol=1e-5)
            else:
                assert (out["normals"][:, r, c] == IGNORE).all()


def test_positive_angle_turns_content_counter_clockwise_as_displayed():
    h = w = 21
    image = torch.zeros(3, h, w)
    label = torch.zeros(h, w, dtype=torch.int64)
    image[:, 10, 17] = 1.0  # right of the centre (10, 10)
    label[10, 17] = 3
    out = fixed_warp(1.0, 90.0)({"image": image, "semseg": label}, rng())
    assert out["semseg"][3, 10] == 3 and (out["semseg"] == 3).sum() == 1  # now above the centre
    assert out["image"][0].argmax() == 3 * w + 10


@pytest.mark.parametrize("angle", [12.0, -25.0, 40.0, 90.0])
def test_sphere_normals_are_rotation_invariant(angle):
    size, radius = 41, 18.0
    n = sphere(size, radius)
    out = fixed_warp(1.0, angle)({"image": torch.zeros(3, size, size), "normals": n}, rng())["normals"]
    compare = valid(out) & torch.from_numpy(sphere_radius_mask(size, radius, 0.8))
    assert compare.sum() > 500
    error = (out - n).abs().amax(0)[compare]
    assert error.max() < 0.08, float(error.max())
    # the test has teeth: the same pixel move with the values turned the other way (by -angle) is far off
    task = get_task("normals")
    wrong_sign = task.rotate_values(out, -2 * angle)
    assert (wrong_sign - n).abs().amax(0)[compare].max() > 0.3


def test_zoom_enlarges_the_sphere():
    size, radius, scale = 41, 14.0, 1.3
    n = sphere(size, radius)
    out = fixed_warp(scale, 20.0)({"image": torch.zeros(3, size, size), "normals": n}, rng())["normals"]
    bigger = sphere(size, radius * scale)
    compare = valid(out) & valid(bigger) & torch.from_numpy(sphere_radius_mask(size, radius * scale, 0.8))
    assert compare.sum() > 500
    assert (out - bigger).abs().amax(0)[compare].max() < 0.08


@FAST
@given(scale=st.floats(0.6, 1.6), angle=st.floats(-30, 30), depth=st.floats(0.5, 20))
def test_depth_is_divided_by_the_scale(scale, angle, depth):
    sample = {"image": torch.zeros(3, 9, 11), "depth": torch.full((1, 9, 11), depth)}
    out = fixed_warp(scale, angle)(sample, rng())["depth"]
    inside = out != IGNORE
    assert inside.any()
    torch.testing.assert_close(out[inside], torch.full_like(out[inside], depth / scale))
    kept = fixed_warp(scale, angle, scale_depth=False)(sample, rng())["depth"]
    assert torch.all(kept[kept != IGNORE] == torch.tensor(depth, dtype=torch.float32))


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(3, 12), w=st.integers(3, 12),
       scales=st.tuples(st.floats(0.4, 1.0), st.floats(1.0, 1.8)), limit=st.floats(0, 180))
def test_no_class_leaks_into_out_of_view_pixels(seed, h, w, scales, limit):
    sample = random_sample(seed, h, w, ignore_fraction=0.0)
    out = RandomScaleRotate(scales=scales, degrees=(-limit, limit))(sample, rng(seed))
    outside = out["semseg"] == IGNORE  # the input has no ignored pixel: 255 means out of view
    for key in CLASS_TASKS:
        present = set(sample[key].unique().tolist()) | {IGNORE}
        assert set(out[key].unique().tolist()) <= present
        assert torch.equal(out[key] == IGNORE, outside)
    for key in ("sal", "edge", "depth"):
        assert torch.equal(out[key][0] == IGNORE, outside)
    assert torch.equal((out["normals"] == IGNORE).all(0), outside)
    assert torch.equal((out["normals"] == IGNORE).any(0), outside)
    assert set(out["sal"].unique().tolist()) <= {0.0, 1.0, float(IGNORE)}


def test_zoom_out_pads_corners_with_ignore():
    sample = random_sample(1, 10, 10, ignore_fraction=0.0)
    out = fixed_warp(0.5, 0.0)(sample, rng())
    for key in CLASS_TASKS:
        assert out[key][0, 0] == IGNORE and out[key][-1, -1] == IGNORE
    assert (out["normals"][:, 0, 0] == IGNORE).all()
    assert out["image"][:, 0, 0].abs().max() == 0


# --- pad / crop ------------------------------------------------------------------------------------

@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 10), w=st.integers(1, 10),
       th=st.integers(1, 12), tw=st.integers(1, 12), random=st.booleans())
def test_pad_crop_window(seed, h, w, th, tw, random):
    sample = random_sample(seed, h, w, ignore_fraction=0.0)
    sample["semseg"] = torch.arange(h * w).reshape(h, w)  # unique ids: where each pixel came from
    out = PadCrop((th, tw), random=random)(sample, rng(seed))
    assert out["image"].shape == (3, th, tw) and out["semseg"].shape == (th, tw)
    inside = out["semseg"] != IGNORE
    rows = inside.any(1).nonzero().flatten()
    cols = inside.any(0).nonzero().flatten()
    nh, nw = min(h, th), min(w, tw)  # as much of the image as fits
    assert len(rows) == nh and len(cols) == nw
    r0, c0 = int(rows[0]), int(cols[0])                      # where the kept part lands
    sr, sc = divmod(int(out["semseg"][r0, c0]), w)           # where it starts in the input
    assert 0 <= sr <= h - nh and 0 <= sc <= w - nw and 0 <= r0 <= th - nh and 0 <= c0 <= tw - nw
    assert (sr == 0 or r0 == 0) and (sc == 0 or c0 == 0)     # pad or crop along an axis, not both
    if not random:
        assert (r0, sr) == ((th - h) // 2, 0) if th >= h else (r0, sr) == (0, (h - th) // 2)
        assert (c0, sc) == ((tw - w) // 2, 0) if tw >= w else (c0, sc) == (0, (w - tw) // 2)
    rest = torch.ones(th, tw, dtype=torch.bool)
    rest[r0:r0 + nh, c0:c0 + nw] = False
    for key, fill in (("image", 0.0), ("semseg", IGNORE), ("human_parts", IGNORE), ("normals", IGNORE),
                      ("depth", IGNORE), ("sal", IGNORE), ("edge", IGNORE)):
        got = out[key]
        assert torch.equal(got[..., r0:r0 + nh, c0:c0 + nw], sample[key][..., sr:sr + nh, sc:sc + nw]), key
        assert (got[..., rest] == fill).all(), key


def test_pad_crop_random_offsets_cover_the_range():
    sample = random_sample(0, 6, 6, ignore_fraction=0.0)
    seen = set()
    for s in range(100):
        out = PadCrop((4, 9))(sample, rng(s))
        inside = out["semseg"] != IGNORE
        seen.add(int(inside.any(0).nonzero()[0]))
    assert seen == {0, 1, 2, 3}  # 3 padding columns: the image may start at 0..3


def test_centred_crop_takes_the_middle():
    label = torch.arange(36).reshape(6, 6)
    out = PadCrop((2, 4), random=False)({"image": torch.zeros(3, 6, 6), "semseg": label}, rng())
    assert torch.equal(out["semseg"], label[2:4, 1:5])


# --- resize ----------------------------------------------------------------------------------------

@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 10), w=st.integers(1, 10),
       th=st.integers(1, 14), tw=st.integers(1, 14))
def test_resize_labels_nearest(seed, h, w, th, tw):
    sample = random_sample(seed, h, w)
    out = Resize((th, tw))(sample, rng())
    assert out["image"].shape == (3, th, tw)
    for key in CLASS_TASKS:
        assert set(out[key].unique().tolist()) <= set(sample[key].unique().tolist())
    for r in range(th):
        for c in range(tw):
            sr = min(int(math.floor((r + 0.5) * h / th)), h - 1)
            sc = min(int(math.floor((c + 0.5) * w / tw)), w - 1)
            assert out["semseg"][r, c] == sample["semseg"][sr, sc]
            assert out["depth"][0, r, c] == sample["depth"][0, sr, sc]
            assert torch.allclose(out["normals"][:, r, c], sample["normals"][:, sr, sc], atol=1e-6)


def test_resize_image_keeps_constants_and_range():
    image = torch.full((3, 30, 40), 0.25)
    for size in ((10, 12), (45, 60)):
        out = Resize(size)({"image": image}, rng())["image"]
        torch.testing.assert_close(out, torch.full((3, *size), 0.25))
    noisy = Resize((7, 9))({"image": torch.rand(3, 30, 40)}, rng())["image"]
    assert noisy.min() >= -1e-6 and noisy.max() <= 1 + 1e-6


# --- preprocess: the network input of every prediction ---------------------------------------------

@FAST
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)),
                                                      min_size=1, max_size=3),
       size=st.tuples(st.integers(1, 24), st.integers(1, 24)))
def test_preprocess_equals_the_training_resize_and_normalize(seed, sizes, size):
    """Bit for bit what ``Resize(size)`` then ``Normalize()`` give each sample, whatever the sizes (shrinking,
    enlarging, one side each, or already the size)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    batch = preprocess(images, size)
    assert batch.shape == (len(images), 3, *size) and batch.dtype == torch.float32
    pipeline = Compose([Resize(size), Normalize()])
    for i, image in enumerate(images):
        assert torch.equal(batch[i], pipeline({"image": image}, rng())["image"])
    if len({tuple(s) for s in sizes}) == 1:  # a batch tensor gives the same
        assert torch.equal(preprocess(torch.stack(images), size), batch)


def test_resize_image_antialiases_only_when_shrinking():
    """Against a slow reference: shrinking 8 -> 2 with antialiasing averages a neighbourhood with the
    stretched triangle (tent) filter, weights renormalised at the border; enlarging is plain bilinear."""
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    shrunk = resize_image(image, (2, 2))
    # antialiased bilinear with scale 4: triangle filter of support 8 centred on the block centre
    weights = torch.tensor([1.0, 3, 5, 7, 7, 5, 3, 1], dtype=torch.float64)
    expected = torch.zeros(3, 2, 2, dtype=torch.float64)
    for r in range(2):
        for c in range(2):
            acc, total = torch.zeros(3, dtype=torch.float64), 0.0
            for i in range(8):
                for j in range(8):
                    y, x = 4 * r - 2 + i, 4 * c - 2 + j
                    if 0 <= y < 8 and 0 <= x < 8:
                        acc += weights[i] * weights[j] * image[:, y, x]
                        total += float(weights[i] * weights[j])
            expected[:, r, c] = acc / total
    torch.testing.assert_close(shrunk, expected)
    enlarged = resize_image(image[:, :2, :2], (4, 4))  # no antialiasing: plain bilinear at pixel centres
    expected_row = [image[0, 0, 0], 0.75 * image[0, 0, 0] + 0.25 * image[0, 0, 1],
                    0.25 * image[0, 0, 0] + 0.75 * image[0, 0, 1], image[0, 0, 1]]
    torch.testing.assert_close(enlarged[0, 0], torch.stack(expected_row))
    assert resize_image(image, (8, 8)) is image


def test_preprocess_constants_and_bad_input():
    image = torch.full((3, 10, 14), 0.5)
    batch = preprocess([image, torch.zeros(3, 32, 32)], (32, 32))
    assert batch.shape == (2, 3, 32, 32)
    for c in range(3):
        assert torch.allclose(batch[0, c], torch.tensor((0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-6)
        assert torch.allclose(batch[1, c], torch.tensor(-IMAGENET_MEAN[c] / IMAGENET_STD[c]), atol=1e-6)
    with pytest.raises(InputError, match="wrap it in a list"):
        preprocess(image, (8, 8))
    with pytest.raises(InputError, match="at least one image"):
        preprocess([], (8, 8))
    with pytest.raises(InputError, match=r"\[3, H, W\]"):
        preprocess([torch.zeros(1, 8, 8)], (8, 8))


# --- whole pipelines -------------------------------------------------------------------------------

@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(4, 16), w=st.integers(4, 16),
       mode=st.sampled_from(["crop", "resize"]))
def test_normals_stay_unit_and_ignore_stays_whole(seed, h, w, mode):
    sample = random_sample(seed, h, w)
    for transform in (train_transforms((10, 12), mode=mode), eval_transforms((9, 7)),
                      RandomScaleRotate((0.5, 2.0), (-180, 180)), PadCrop(13), Resize(5)):
        out = transform(sample, rng(seed))
        n = out["normals"]
        ignored = n == IGNORE
        assert torch.equal(ignored.any(0), ignored.all(0))
        keep = ~ignored.any(0)
        torch.testing.assert_close(n[:, keep].norm(dim=0), torch.ones(int(keep.sum())), atol=1e-5, rtol=0)


def test_same_seed_same_output_and_meta_passed_through():
    sample = random_sample(3, 12, 14)
    t = train_transforms((10, 10))
    a, b, c = t(sample, rng(5)), t(sample, rng(5)), t(sample, rng(6))
    for key in sample:
        if key == "meta":
            assert a[key] is sample[key]
        else:
            assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in sample if k != "meta")


def test_normalize_matches_formula():
    image = torch.rand(3, 4, 5, dtype=torch.float64)
    out = Normalize()({"image": image, "semseg": torch.zeros(4, 5, dtype=torch.int64)}, rng())
    for ch in range(3):
        expected = (image[ch] - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        torch.testing.assert_close(out["image"][ch], expected)
    assert torch.equal(out["semseg"], torch.zeros(4, 5, dtype=torch.int64))
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_eval_transforms_are_deterministic_and_sized():
    sample = random_sample(0, 20, 30)
    t = eval_transforms((8, 16))
    a, b = t(sample, rng(0)), t(sample, rng(1))
    for key in sample:
        if key != "meta":
            assert torch.equal(a[key], b[key])
    assert a["image"].shape == (3, 8, 16) and a["semseg"].shape == (8, 16)


def test_train_modes():
    sample = random_sample(0, 20, 30)
    for mode in ("crop", "resize"):
        out = train_transforms((16, 16), mode=mode)(sample, rng())
        assert out["image"].shape == (3, 16, 16) and out["normals"].shape == (3, 16, 16)
    steps = [type(t).__name__ for t in train_transforms(8, flip=False).transforms]
    assert steps == ["RandomScaleRotate", "PadCrop", "Normalize"]


# --- the official NYUD recipe (data.scale_rotate: reference) ----------------------------------------

NYUD_SCALES = (1.0, 1.2, 1.5)


def is_pure_zoom(sample: dict, out: dict, scale: float) -> bool:
    """``out`` is ``sample`` zoomed by ``scale`` about the centre with no rotation, checked pixel by pixel
    from the slow source map: labels copied from the nearest source pixel (normals unrotated, exactly),
    depth divided by ``scale``, 255 outside the view."""
    h, w = sample["semseg"].shape
    for r in range(h):
        for c in range(w):
            sr, sc = slow_source(r, c, h, w, scale, 0.0)
            if abs((sr % 1) - 0.5) < 1e-6 or abs((sc % 1) - 0.5) < 1e-6:
                continue  # half-way between two source pixels: either is nearest
            nr, nc = math.floor(sr + 0.5), math.floor(sc + 0.5)
            if not (0 <= nr < h and 0 <= nc < w):
                if not (out["semseg"][r, c] == IGNORE and (out["normals"][:, r, c] == IGNORE).all()
                        and out["depth"][0, r, c] == IGNORE):
                    return False
                continue
            if out["semseg"][r, c] != sample["semseg"][nr, nc]:
                return False
            if not torch.equal(out["normals"][:, r, c], sample["normals"][:, nr, nc]):
                return False
            d = float(sample["depth"][0, nr, nc])
            expected = d if d == IGNORE else d / scale
            if not math.isclose(float(out["depth"][0, r, c]), expected, rel_tol=1e-6):
                return False
    return True


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(2, 9), w=st.integers(2, 9))
def test_nyud_reference_recipe_zooms_by_an_official_scale_and_never_rotates(seed, h, w):
    from m3vit.data import scale_rotate_options

    sample = random_sample(seed, h, w, ignore_fraction=0.1)
    out = RandomScaleRotate(**scale_rotate_options("nyud", "reference"))(sample, rng(seed))
    assert sum(is_pure_zoom(sample, out, s) for s in NYUD_SCALES) >= 1
    # teeth: a rotated or a continuously scaled warp is no such zoom
    rotated = fixed_warp(1.2, 15.0)(sample, rng())
    assert h * w < 9 or not any(is_pure_zoom(sample, rotated, s) for s in NYUD_SCALES)


def test_nyud_reference_recipe_draws_each_official_scale():
    from m3vit.data import scale_rotate_options

    t = RandomScaleRotate(**scale_rotate_options("nyud", "reference"))
    sample = {"image": torch.zeros(3, 7, 9), "depth": torch.full((1, 7, 9), 6.0)}
    seen = {round(float(6.0 / t(sample, rng(seed))["depth"][0, 3, 4]), 6) for seed in range(60)}
    assert seen == set(NYUD_SCALES)


def test_scale_rotate_recipes_per_dataset():
    from m3vit.data import scale_rotate_options

    pascal = {"scales": (0.75, 1.25), "degrees": (-20.0, 20.0)}
    assert scale_rotate_options("nyud", "reference") == {"scale_choices": NYUD_SCALES, "degrees": (0.0, 0.0)}
    for name, recipe in (("nyud", "pascal"), ("pascal_context", "reference"), ("synthetic", "reference")):
        assert scale_rotate_options(name, recipe) == pascal
    with pytest.raises(ValueError, match="recipe must be one of"):
        scale_rotate_options("nyud", "official")


def test_the_run_config_picks_the_nyud_recipe(nyud_tree):
    from m3vit.engine import builders
    from m3vit.engine.config import load_config

    for recipe, expected in (("reference", NYUD_SCALES), ("pascal", None)):
        cfg = load_config(None, {"model.name": "m3vit_micro", "data.name": "nyud", "data.root": str(nyud_tree.root),
                                 "data.size": [32, 32], "data.augment": "resize", "data.scale_rotate": recipe})
        transform = builders.build_train_dataset(cfg).transform
        (warp,) = [t for t in transform.transforms if isinstance(t, RandomScaleRotate)]
        assert warp.scale_choices == expected
        assert warp.degrees == ((0.0, 0.0) if expected else (-20.0, 20.0))


# --- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: PadCrop(0), "size"), (lambda: PadCrop((3,)), "size"), (lambda: Resize((2.5, 3)), "size"),
    (lambda: Resize(True), "size"), (lambda: train_transforms(-1), "size"), (lambda: eval_transforms("a"), "size"),
    (lambda: RandomScaleRotate(scales=(0, 1)), "scales"), (lambda: RandomScaleRotate(scales=(2, 1)), "scales"),
    (lambda: RandomScaleRotate(degrees=(10, -10)), "degrees"), (lambda: RandomScaleRotate(degrees=5), "degrees"),
    (lambda: RandomScaleRotate(degrees=(0, float("nan"))), "degrees"),
    (lambda: RandomScaleRotate(scale_choices=[]), "scale_choices"),
    (lambda: RandomScaleRotate(scale_choices=[1.0, -1.2]), "scale_choices"),
    (lambda: RandomHorizontalFlip(1.5), "p"), (lambda: train_transforms(8, mode="pad"), "mode"),
    (lambda: Normalize(std=(1, 0, 1)), "std"), (lambda: Normalize(mean=(0, 0)), "mean"),
    (lambda: Compose([1]), "transforms"),
])
def test_bad_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_samples_are_clear_errors():
    with pytest.raises(ValueError, match="'image'"):
        PadCrop(4)({"semseg": torch.zeros(4, 4, dtype=torch.int64)}, rng())
    with pytest.raises(ValueError, match="'semseg'"):
        PadCrop(4)({"image": torch.zeros(3, 4, 4), "semseg": torch.zeros(4, 5, dtype=torch.int64)}, rng())
    with pytest.raises(ValueError, match="'mystery'"):
        RandomHorizontalFlip(1.0)({"image": torch.zeros(3, 4, 4), "mystery": torch.zeros(4, 4)}, rng())
