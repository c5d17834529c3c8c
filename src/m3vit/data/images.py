"""The one image reader of m3vit (datasets, ``m3vit infer``, ``m3vit hw --image``): any file PIL reads ->
``float32 [3, H, W]`` RGB in ``[0, 1]``, with its EXIF orientation applied.

How pixel values become ``[0, 1]``, by PIL mode:

* 8-bit modes (``L``, ``RGB``, ``P`` palette, ``1``, ``CMYK``, ``YCbCr``, ...): converted to RGB by PIL,
  divided by 255. A 16-bit-per-channel colour PNG is one of these: PIL itself reduces it to 8 bits.
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): divided by 65535.
* 32-bit integer (``I``): divided by 65535 when every value is in 0..65535 (16-bit data, as some
  readers give it); other ranges have no defined white and are refused.
* 32-bit float (``F``, e.g. a float TIFF): taken as stored; every value must lie in ``[0, 1]`` (NaN,
  inf and any other range are refused with the range found: rescale the file).
* Greyscale is replicated to the three channels; an alpha channel is dropped (the stored colour of
  transparent pixels is used, not composited over a background).

Images larger than ``max_pixels`` (default ``MAX_PIXELS``) are refused from the file's header, before
anything is decoded; so are images above PIL's own decompression-bomb limit (``2 x
PIL.Image.MAX_IMAGE_PIXELS``, 179 M pixels by default), whatever ``max_pixels`` says.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import ConfigError, InputError

__all__ = ["MAX_PIXELS", "ImageReadError", "ImageTooLargeError", "read_image"]

log = logging.getLogger(__name__)

#: Default largest image (width x height) ``read_image`` decodes: 50 M pixels, e.g. 8660x5773, above
#: common camera photos. Decoded it takes 12 bytes per pixel (0.6 GB as float32 RGB); ``m3vit infer``
#: needs about 23 bytes per pixel in all, ~1.2 GB (see ``m3vit.engine.inference``). Pass ``max_pixels``
#: (CLI: ``--max-pixels``) to change it.
MAX_PIXELS = 50_000_000

#: The formats ``read_image`` opens (PIL's names): photographs and lossless images. Others are refused
#: before decoding: PIL's ICO reader decodes the whole embedded image before its size can be checked, and
#: EPS/PDF would run Ghostscript on the file.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM", "TGA", "JPEG2000")

# Modes whose values are not 8-bit: read as numbers, not converted by PIL (which would clip them).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")
# What PIL raises for a file it cannot identify or decode (struct/zlib errors escape some plugins).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """``IMAGE_FORMATS`` that this PIL can open (``Image.open(formats=)`` needs their plugins registered)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


class ImageReadError(InputError):
    """An image file is missing, unreadable, corrupt or has pixel values m3vit cannot interpret; the
    message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than allowed (``max_pixels``); refused before it is decoded. ``width`` and
    ``height`` are the image's (0 when PIL refused it before saying), ``limit`` the pixel limit applied."""

    def __init__(self, message: str, width: int = 0, height: int = 0, limit: int = 0):
        super().__init__(message)
        self.width, self.height, self.limit = width, height, limit


def read_image(path: str | os.PathLike | BinaryIO, *, max_pixels: int | None = MAX_PIXELS,
               name: str | None = None) -> torch.Tensor:
    """The image file ``path`` as RGB ``float32 [3, H, W]`` in ``[0, 1]``, EXIF orientation applied.

    ``path`` may also be an open binary file (e.g. ``io.BytesIO`` of an upload); ``name`` is what error
    messages call it (default: the path). See the module docstring for how each PIL mode is scaled.
    ``max_pixels`` (None: only PIL's own limit) bounds width x height, checked from the header before
    decoding. Raises ``ImageTooLargeError`` above it and ``ImageReadError`` for a missing, unreadable or
    corrupt file; both name the file.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    source = path if hasattr(path, "read") else Path(path)
    path = name if name is not None else (source if isinstance(source, Path) else "<image>")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS; our own limit (checked below) decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=_open_formats()) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{path}: {width}x{height} is {width * height:,} pixels, above the limit of "
                        f"{max_pixels:,} (downscale the image, or raise the limit: max_pixels / --max-pixels)",
                        width, height, max_pixels)
                ImageOps.exif_transpose(img, in_place=True)
                chw, white = _pixels(img, path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:  # no allowed format recognises it (PIL's message holds an object's repr)
        raise ImageReadError(f"{path}: not an image in a format m3vit reads ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{path}: more pixels than PIL's decompression-bomb limit of "
                                 f"{2 * Image.MAX_IMAGE_PIXELS} allows; downscale the image") from None
    except _DECODE_ERRORS as exc:
        if isinstance(exc, ImageReadError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{path}: not a readable image ({reason})") from None
    image = torch.from_numpy(chw)
    if image.dtype == torch.uint8:
        return image.float().div_(white)
    return image.div_(white) if white != 1 else image


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, float]:
    """A writable C-contiguous ``[3, H, W]`` array (uint8, or float32 for wide modes) and its white value."""
    if img.mode in _WIDE_MODES:
        values = np.asarray(img)
        if img.mode in _SIXTEEN_BIT_MODES:
            white = 65535.0
        elif img.mode == "I":
            low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
            if low < 0 or high > 65535:
                raise ImageReadError(f"{path}: 32-bit integer pixels span {low}..{high}; m3vit reads integer images "
                                     f"as 8-bit (0..255) or 16-bit (0..65535): convert the file to one of those")
            white = 65535.0
        else:  # "F": as stored
            values = values.astype(np.float32, copy=False)
            finite = np.isfinite(values)
            if not finite.all():
                raise ImageReadError(f"{path}: float image holds NaN or infinite values")
            low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            if low < 0 or high > 1:
                raise ImageReadError(f"{path}: float pixels span [{low:.4g}, {high:.4g}]; m3vit reads float images "
                                     f"as intensities in [0, 1]: rescale the file")
            white = 1.0
        values = values.astype(np.float32)  # a writable native-order copy
    else:
        values = np.asarray(img if img.mode in ("RGB", "L") else img.convert("RGB"))
        if values.dtype != np.uint8:  # a PIL mode this reader does not know
            raise ImageReadError(f"{path}: unsupported pixel mode {img.mode!r}")
        white = 255.0
    chw = values[None] if values.ndim == 2 else values.transpose(2, 0, 1)
    chw = chw[:1] if chw.shape[0] == 2 else chw[:3]  # grey + alpha -> grey; RGBA -> RGB
    if chw.shape[0] == 1:
        chw = np.broadcast_to(chw, (3, *chw.shape[1:]))
    return np.array(chw, order="C"), white
