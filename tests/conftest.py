"""Suite-wide fixtures."""

import struct
import warnings
import zlib

import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test model is tiny: one intra-op thread avoids OpenMP overhead, which on a shared 2-core
    machine makes threads wait on each other (a test's results never depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_blank_png(path, width: int, height: int):
    """A 1-bit all-black PNG of any size written row by row, without PIL (13000x13000 is ~20 KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def blank_png():
    """Factory ``blank_png(path, width, height) -> path``: a huge-dimension image that is tiny on disk."""
    return write_blank_png


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory):
    """The issue's input: a 13000x13000 PNG (169 M pixels, ~20 KB on disk)."""
    path = write_blank_png(tmp_path_factory.mktemp("huge") / "huge.png", 13000, 13000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert path.stat().st_size < 100_000 and Image.open(path).size == (13000, 13000)
    return path
