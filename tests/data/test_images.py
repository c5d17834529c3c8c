"""The one image reader (``m3vit.data.images.read_image``): every PIL mode scaled by its real range, EXIF
orientation, alpha and palettes, the pixel limit checked from the header, and errors naming the file.

Each behaviour is checked through every entry point that reads images: the reader itself, the datasets'
``m3vit.data._io.read_image`` and inference's ``m3vit.engine.inference.read_image``.
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from m3vit.utils.errors import ConfigError, InputError

READERS = ["m3vit.data.images", "m3vit.data._io", "m3vit.engine.inference"]


@pytest.fixture(params=READERS)
def read_image(request):
    return importlib.import_module(request.param).read_image


def _errors():
    from m3vit.data.images import ImageReadError, ImageTooLargeError

    return ImageReadError, ImageTooLargeError


def test_one_reader_everywhere():
    readers = {importlib.import_module(name).read_image for name in READERS}
    assert len(readers) == 1
    from m3vit.data import read_image
    from m3vit.engine.inference import ImageReadError

    assert readers == {read_image} and issubclass(ImageReadError, InputError)


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.float32 and tensor.dim() == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# 16-bit, 32-bit integer and float images: scaled by their real range, not clipped to 8 bits
# ---------------------------------------------------------------------------------------------
def test_sixteen_bit_png_is_scaled_by_65535_not_clipped(read_image, tmp_path):
    """The issue's case: a 16-bit PNG used to come out 99.5% white."""
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    path = tmp_path / "depthy.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    expected = values.astype(np.float32) / 65535
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), expected)
    assert float((image == 1).float().mean()) < 0.01


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 23), width=st.integers(1, 23), big_endian=st.booleans(), fmt=st.sampled_from(["png", "tif"]),
       seed=st.integers(0, 2**32 - 1))
def test_sixteen_bit_any_size_and_byte_order(read_image, tmp_path, height, width, big_endian, fmt, seed):
    values = np.random.default_rng(seed).integers(0, 65536, (height, width), dtype=np.uint16)
    path = tmp_path / f"g16.{fmt}"
    Image.fromarray(values.astype(">u2") if big_endian else values).save(path)
    image = _hwc(read_image(path))
    expected = values.astype(np.float32) / np.float32(65535)
    for c in range(3):
        np.testing.assert_allclose(image[..., c], expected, rtol=0, atol=1e-7)


def test_thirty_two_bit_integer_with_sixteen_bit_data(read_image, tmp_path):
    values = np.array([[0, 1000, 65535], [30000, 2, 40000]], dtype=np.int32)
    path = tmp_path / "i32.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_allclose(_hwc(read_image(path))[..., 1], values / 65535, atol=1e-7)


@pytest.mark.parametrize("low, high", [(-5, 100), (0, 70000)])
def test_thirty_two_bit_integer_outside_sixteen_bits_is_refused(read_image, tmp_path, low, high):
    image_read_error, _ = _errors()
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[low, high]], dtype=np.int32)).save(path)
    with pytest.raises(image_read_error) as err:
        read_image(path)
    assert str(err.value).startswith(str(path)) and f"{low}..{high}" in str(err.value)


def test_float_tiff_is_taken_as_stored(read_image, tmp_path):
    values = np.random.default_rng(1).random((9, 13)).astype(np.float32)
    values[0, 0], values[1, 1] = 0.0, 1.0
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    image = _hwc(read_image(path))
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], values)


@pytest.mark.parametrize("bad, fragment", [(1.5, "span [0, 1.5]"), (-0.25, "span [-0.25, 0.8182]"),
                                           (float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite")])
def test_float_tiff_outside_the_unit_range_is_refused(read_image, tmp_path, bad, fragment):
    image_read_error, _ = _errors()
    values = np.linspace(0, 0.9, 12, dtype=np.float32).reshape(3, 4)
    values[2, 3] = bad
    path = tmp_path / "hdr.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(image_read_error) as err:
        read_image(path)
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# 8-bit modes (unchanged values), alpha, palettes, EXIF orientation
# ---------------------------------------------------------------------------------------------
def _mode_case(mode: str, rng: np.random.Generator, h: int, w: int):
    """(image, expected float64 [H, W, 3]) for a PIL mode, expected computed from the raw values."""
    if mode == "RGB":
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(a), a / 255
    if mode == "RGBA":
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        return Image.fromarray(a, "RGBA"), a[..., :3] / 255  # alpha dropped, stored colour kept
    if mode == "L":
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        return Image.fromarray(a), np.repeat(a[..., None], 3, axis=2) / 255
    if mode == "LA":
        a = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
        return Image.fromarray(a, "LA"), np.repeat(a[..., :1], 3, axis=2) / 255
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        ids = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(ids, "L").convert("P")
        img.putpalette(palette.reshape(-1).tolist())
        return img, palette[ids] / 255
    if mode == "1":
        bits = rng.random((h, w)) < 0.5
        return Image.fromarray(bits), np.repeat(bits[..., None], 3, axis=2).astype(np.float64)
    raise AssertionError(mode)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1"]), height=st.integers(1, 20),
       width=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_eight_bit_modes(read_image, tmp_path, mode, height, width, seed):
    img, expected = _mode_case(mode, np.random.default_rng(seed), height, width)
    path = tmp_path / "m.png"
    img.save(path)
    image = _hwc(read_image(path))
    assert image.shape == (height, width, 3)
    np.testing.assert_allclose(image, expected.astype(np.float32), rtol=0, atol=1e-7)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_exif_orientation_is_applied(read_image, tmp_path, suffix):
    """Orientation 6: the stored picture must be turned 90 degrees clockwise to be seen upright."""
    stored = np.zeros((20, 30, 3), dtype=np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored picture ...
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"phone.{suffix}"
    Image.fromarray(stored).save(path, exif=exif)
    image = read_image(path)
    assert image.shape == (3, 30, 20)
    upright = np.rot90(stored, k=-1) / 255  # ... is on top once upright
    assert np.abs(_hwc(image) - upright).mean() < 0.02


# ---------------------------------------------------------------------------------------------
# Huge images: refused from the header, before decoding
# ---------------------------------------------------------------------------------------------
def test_huge_image_is_refused_before_decoding(read_image, huge_png, monkeypatch):
    _, too_large = _errors()

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(too_large) as err:
        read_image(huge_png)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith(str(huge_png)) and "13000x13000" in message and "169,000,000 pixels" in message
    assert "\n" not in message


def test_pixel_limit_is_configurable(tmp_path):
    from m3vit.data.images import MAX_PIXELS, ImageTooLargeError, read_image

    assert MAX_PIXELS >= 24_000_000  # a common camera photo passes by default
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(path)
    assert read_image(path, max_pixels=120).shape == (3, 10, 12)
    with pytest.raises(ImageTooLargeError, match="12x10 is 120 pixels, above the limit of 119 "):
        read_image(path, max_pixels=119)
    assert read_image(path, max_pixels=None).shape == (3, 10, 12)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_pixels must be a positive integer or None"):
            read_image(path, max_pixels=bad)


def test_beyond_pils_own_limit_is_refused_even_without_ours(tmp_path, blank_png):
    from m3vit.data.images import ImageTooLargeError, read_image

    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1
    path = blank_png(tmp_path / "bomb.png", side, side)
    with pytest.raises(ImageTooLargeError, match="decompression-bomb limit"):
        read_image(path, max_pixels=None)


# ---------------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------------
def test_unreadable_files_raise_one_input_error_naming_the_file(read_image, tmp_path):
    image_read_error, _ = _errors()
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8) + 7).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (truncated, garbage, tmp_path / "missing.png", tmp_path):
        with pytest.raises(image_read_error) as err:
            read_image(path)
        assert isinstance(err.value, InputError) and str(err.value).startswith(str(path))
        assert "\n" not in str(err.value)
