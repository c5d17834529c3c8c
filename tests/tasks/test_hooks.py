"""Label-value hooks under flips, rotations and zooms: normals, depth, and the identity for the rest."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.tasks import IGNORE, get_task

SETTINGS = settings(max_examples=30, deadline=None)


def normals_label(seed: int, shape, p_ignore: float) -> torch.Tensor:
    """Unit normals ``[..., 3, H, W]`` with IGNORE in all channels at random pixels."""
    g = torch.Generator().manual_seed(seed)
    label = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-3)
    ignore = torch.rand(*shape[:-3], *shape[-2:], generator=g) < p_ignore
    return torch.where(ignore.unsqueeze(-3), torch.full_like(label, IGNORE), label), ignore


label_shapes = st.one_of(
    st.tuples(st.just(3), st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.just(3), st.integers(1, 5), st.integers(1, 5)),
)


@SETTINGS
@given(shape=label_shapes, seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.4]))
def test_normals_flip_negates_x_and_twice_is_identity(shape, seed, p_ignore):
    task = get_task("normals")
    label, ignore = normals_label(seed, shape, p_ignore)
    flipped = task.flip_values(label)
    valid = ~ignore
    assert torch.equal(flipped[..., 0, :, :][valid], -label[..., 0, :, :][valid])
    assert torch.equal(flipped[..., 1:, :, :], label[..., 1:, :, :])
    assert (flipped.movedim(-3, -1)[ignore] == IGNORE).all()
    assert torch.equal(task.flip_values(flipped), label)
    assert torch.equal(label, normals_label(seed, shape, p_ignore)[0])  # input untouched


@SETTINGS
@given(shape=label_shapes, seed=st.integers(0, 10_000), p_ignore=st.sampled_from([0.0, 0.4]),
       angle=st.floats(-360, 360, allow_nan=False))
def test_normals_rotation_keeps_unit_length_z_and_ignored_pixels(shape, seed, p_ignore, angle):
    task = get_task("normals")
    label, ignore = normals_label(seed, shape, p_ignore)
    rotated = task.rotate_values(label, angle)
    valid = ~ignore
    norms = rotated.norm(dim=-3)[valid]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
    assert torch.equal(rotated[..., 2, :, :], label[..., 2, :, :])
    assert (rotated.movedim(-3, -1)[ignore] == IGNORE).all()
    back = task.rotate_values(rotated, -angle)
    assert torch.allclose(back, label, atol=1e-12)


def test_normals_rotation_direction():
    # A normal pointing right (+x) on content rotated 90° counter-clockwise now points up (+y).
    task = get_task("normals")
    right = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(task.rotate_values(right, 90.0).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-7)
    up = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(task.rotate_values(up, 90.0).flatten(), torch.tensor([-1.0, 0.0, 0.0]), atol=1e-7)
    diagonal = torch.tensor([math.sqrt(0.5), 0.0, math.sqrt(0.5)]).view(3, 1, 1)
    rotated = task.rotate_values(diagonal, 30.0).flatten()
    assert torch.allclose(rotated, torch.tensor([math.sqrt(0.5) * math.cos(math.pi / 6),
                                                  math.sqrt(0.5) * math.sin(math.pi / 6), math.sqrt(0.5)]), atol=1e-7)


def test_normals_flip_commutes_with_rotation_as_mirror():
    # Mirroring reverses the rotation sense: flip(rotate(n, a)) == rotate(flip(n), -a).
    task = get_task("normals")
    label, _ = normals_label(1, (3, 4, 4), 0.3)
    assert torch.allclose(task.flip_values(task.rotate_values(label, 37.0)),
                          task.rotate_values(task.flip_values(label), -37.0), atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), batched=st.booleans(), scale=st.floats(0.25, 4.0))
def test_depth_scale_divides_valid_pixels(seed, batched, scale):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1, 3, 4) if batched else (1, 3, 4)
    label = torch.rand(shape, generator=g) * 10 + 0.1
    ignore = torch.rand(shape, generator=g) < 0.3
    label[ignore] = IGNORE
    out = get_task("depth").scale_values(label, scale)
    assert torch.allclose(out[~ignore], label[~ignore] / scale)
    assert (out[ignore] == IGNORE).all()


def test_depth_scale_rejects_non_positive():
    with pytest.raises(ValueError, match="scale"):
        get_task("depth").scale_values(torch.ones(1, 2, 2), 0.0)


@pytest.mark.parametrize("task_name", ["semseg", "human_parts", "sal", "edge", "normals", "depth"])
def test_hooks_that_do_not_apply_are_identity(task_name):
    task = get_task(task_name)
    if task.label_kind == "class":
        label = torch.randint(0, task.channels, (2, 3, 3))
    elif task_name == "normals":
        label = normals_label(0, (3, 3, 3), 0.3)[0]
    else:
        label = torch.rand(1, 3, 3)
    if task_name != "normals":
        assert torch.equal(task.flip_values(label), label)
        assert torch.equal(task.rotate_values(label, 30.0), label)
    if task_name != "depth":
        assert torch.equal(task.scale_values(label, 2.0), label)
