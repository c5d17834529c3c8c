"""Fixtures of the serve tests: a tiny six-task MoE checkpoint and image files made in memory.

Tests reach these through fixtures (``checkpoint``, ``make_image``, ``to_png``, ``serve_tasks``), never
``import conftest``, which is ambiguous once other test folders have their own conftest.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import m3vit

TASKS = ["semseg", "sal", "normals", "depth", "edge", "human_parts"]


def tiny_model():
    """``m3vit_micro`` at 64x64 with 4 experts, top-2, every task (random weights, fixed seed)."""
    torch.manual_seed(0)
    return m3vit.create_model("m3vit_micro", TASKS, img_size=(64, 64), num_experts=4, top_k=2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    m3vit.save_checkpoint(tiny_model(), path)
    return path


def image_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 picture: smooth gradients plus a bright square, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    img = (base * rng.uniform(100, 255, size=3) + rng.uniform(0, 40, size=(height, width, 3))).clip(0, 255)
    top, left = rng.integers(0, max(height // 2, 1)), rng.integers(0, max(width // 2, 1))
    img[top:top + height // 3, left:left + width // 3] = rng.uniform(150, 255, size=3)
    return img.astype(np.uint8)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def serve_tasks():
    return list(TASKS)


@pytest.fixture(scope="session")
def make_image():
    return image_array


@pytest.fixture(scope="session")
def to_png():
    return png_bytes
