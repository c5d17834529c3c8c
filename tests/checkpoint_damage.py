"""Random damage to checkpoint files, for the fuzz tests of the checkpoint loaders (tests/models/test_checkpoint.py,
tests/efficiency/test_streaming.py), and a cap on the address space that turns a large allocation into an error."""

from __future__ import annotations

import json
import re
import resource
import struct
from contextlib import contextmanager

import yaml
from hypothesis import strategies as st

from m3vit.models import ModelConfig


@contextmanager
def address_space_cap(extra_bytes=1 << 30):
    """Cap the process's address space at its current size plus ``extra_bytes``: an attempt to allocate a
    model much larger than that fails at once (instead of swapping the machine), so a test can tell
    "refused before allocating" from "tried"."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def gist(message: str) -> str:
    """The kind of a refusal, for hypothesis' statistics: the message without paths, names and numbers."""
    text = re.sub(r"\S*/\S*", "PATH", message)
    text = re.sub(r"'[^']*'|\[[^\]]*\]|-?\d+", "X", text)
    return text[:70]


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 64),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


def corrupt_weights(draw, weights: bytes) -> bytes:
    """One random corruption of a safetensors file: truncation, bytes overwritten in the header, a rewritten
    JSON header (offsets, dtypes, shapes, entries, metadata) or a huge header length."""
    (length,) = struct.unpack("<Q", weights[:8])
    header, data = json.loads(weights[8:8 + length]), weights[8 + length:]
    kind = draw(st.sampled_from(["truncate", "overwrite", "offsets", "dtype", "shape", "delete", "extra", "entry",
                                 "metadata", "length"]))
    if kind == "truncate":
        return weights[:draw(st.integers(0, len(weights) - 1))]
    if kind == "overwrite":
        out = bytearray(weights)
        for position, value in draw(st.lists(st.tuples(st.integers(0, 8 + length - 1), st.integers(0, 255)),
                                             min_size=1, max_size=4)):
            out[position] = value
        return bytes(out)
    if kind == "length":
        new_length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(length - 16, length + 16).filter(
            lambda n: n >= 0)))
        return struct.pack("<Q", new_length) + weights[8:]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    if kind == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.one_of(
            st.just([end, begin]), st.just([begin - 4, end - 4]), st.just([-begin - 1, end]),
            st.lists(st.integers(-2**65, 2**65), min_size=0, max_size=3), JSON_VALUES))
    elif kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL",
                                                         "F4", "f32", ""]), JSON_VALUES))
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), JSON_VALUES))
    elif kind == "delete":
        del header[name]
    elif kind == "extra":
        header[draw(st.text(min_size=1, max_size=8))] = {
            "dtype": "F32", "shape": draw(st.lists(st.integers(0, 4), max_size=2)),
            "data_offsets": draw(st.lists(st.integers(-8, len(data) + 8), min_size=2, max_size=2))}
    elif kind == "entry":
        header[name] = draw(st.one_of(JSON_VALUES, st.fixed_dictionaries(
            {k: st.just(v) for k, v in entry.items() if k != draw(st.sampled_from(sorted(entry)))})))
    else:
        header["__metadata__"] = draw(JSON_VALUES)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


MODEL_FIELDS = ModelConfig.keys()


def corrupt_config(draw, config_text: str) -> bytes:
    """One random corruption of a checkpoint's config.yaml: random bytes, deleted keys, random field values."""
    kind = draw(st.sampled_from(["bytes", "delete", "value", "value", "top"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    meta = yaml.safe_load(config_text)
    if kind == "delete":
        for key in draw(st.lists(st.sampled_from(MODEL_FIELDS), min_size=1, max_size=3, unique=True)):
            meta["model"].pop(key, None)
    elif kind == "value":
        key = draw(st.sampled_from(MODEL_FIELDS))
        meta["model"][key] = draw(st.one_of(
            JSON_VALUES, st.integers(0, 400000), st.sampled_from([300000, 96, 8, 2, 3, 0, -1]),
            st.dictionaries(st.sampled_from(["semseg", "depth", "sal"]), st.integers(-1, 9), max_size=3)))
    else:
        key = draw(st.sampled_from(["format", "model", "version", "step", "run"]))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(JSON_VALUES)
    return yaml.safe_dump(meta).encode()
