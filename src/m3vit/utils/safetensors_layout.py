"""The one reader of safetensors headers (each tensor's dtype, shape and byte range, checked against the file),
and reading a tensor's bytes at those offsets with ``os.preadv``, without mapping the file.

The header is checked as strictly as the format defines it, so a file that passes can be read by
``safetensors`` and at the offsets given here without touching anything but that tensor's bytes; every
failure is a ``CheckpointError`` naming the file and what is wrong. Reading with ``preadv`` into a tensor's
own storage (rather than ``safetensors.torch.load_file``, whose tensors live in a private memory map of the
file) keeps the process's memory at one copy of the weights and never ties a model to the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["TensorEntry", "DTYPES", "MAX_HEADER_BYTES", "read_safetensors_layout", "tensor_bytes", "pread_exact",
           "read_tensor_into"]

# safetensors dtype names (the format's header) -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
# The format's own limit on the JSON header (safetensors refuses larger ones).
MAX_HEADER_BYTES = 100_000_000
_METADATA = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype, shape and its absolute byte range ``[begin, end)``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_layout(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file by name (in header order), from its header alone.

    The format: an unsigned little-endian 64-bit header length N, N bytes of UTF-8 JSON mapping each name
    to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header;
    an optional ``"__metadata__"`` maps strings to strings), then the data, which the tensors cover
    exactly: ordered by offset they are contiguous from 0 to the end of the file, and each one's byte
    count is its dtype's size times its number of elements.

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``CheckpointError`` (naming the file
    and, where there is one, the tensor) for anything else that is wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes; truncated?)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} is over the "
                                      f"format's limit of {MAX_HEADER_BYTES} bytes)")
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated: the header says it is {header_len} bytes but the file "
                                      f"holds {size - 8} after the length")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if len(raw) != header_len:  # the file shrank while it was read
        raise CheckpointError(f"{path}: truncated while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not valid UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_start = 8 + header_len
    layout = {name: _entry(path, name, info) for name, info in header.items() if name != _METADATA}
    metadata = header.get(_METADATA)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: the header's {_METADATA} must map strings to strings")
    _check_coverage(path, layout, size - data_start)
    return {name: TensorEntry(e.dtype, e.shape, data_start + e.begin, data_start + e.end)
            for name, e in layout.items()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info) -> TensorEntry:
    """One header entry, with offsets still relative to the data section."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in the header")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype {info['dtype']!r} "
                              f"(known: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r} (a list of integers >= 0)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r} (two integers)")
    begin, end = offsets
    if begin < 0 or end < 0:
        raise CheckpointError(f"{path}: negative data_offsets {offsets} for tensor {name!r}")
    if end < begin:
        raise CheckpointError(f"{path}: data_offsets {offsets} of tensor {name!r} end before they begin")
    expected = dtype.itemsize * _numel(shape)
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape {shape} of "
                              f"{info['dtype']} needs {expected}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_coverage(path: Path, layout: dict[str, TensorEntry], data_bytes: int) -> None:
    """The tensors, ordered by offset, must tile the data section exactly (no gap, overlap or excess)."""
    position, previous = 0, None
    for name, entry in sorted(layout.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {entry.end} of the data, "
                                  f"which holds {data_bytes}")
        if entry.begin != position:
            what = "overlaps" if entry.begin < position else "leaves a gap after"
            raise CheckpointError(f"{path}: tensor {name!r} (data_offsets [{entry.begin}, {entry.end}]) {what} "
                                  f"{previous!r}")
        position, previous = entry.end, name
    if position != data_bytes:
        raise CheckpointError(f"{path}: the tensors cover {position} bytes of data but the file holds {data_bytes} "
                              f"(extra bytes at the end)")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_bytes(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` (short reads continued; end of file is an error)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done} (truncated since its "
                                  f"header was read?)")
        done += n


def read_tensor_into(fd: int, path: Path, entry: TensorEntry, target: Tensor) -> None:
    """Read the tensor at ``entry`` from the open file ``fd`` into ``target`` (its shape; any device, and any
    dtype: the values are cast). A contiguous CPU target of the file's dtype is filled in place; otherwise
    through a CPU staging tensor of this one tensor's size."""
    if tuple(target.shape) != entry.shape:
        raise CheckpointError(f"{path}: a tensor of shape {list(entry.shape)} at byte {entry.begin} cannot fill "
                              f"one of shape {list(target.shape)}")
    if target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous():
        pread_exact(fd, tensor_bytes(target), entry.begin, path)
        return
    staging = torch.empty(entry.shape, dtype=entry.dtype)
    pread_exact(fd, tensor_bytes(staging), entry.begin, path)
    target.copy_(staging)
