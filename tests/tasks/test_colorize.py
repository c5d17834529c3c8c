"""Pictures of predictions and labels: shapes, dtypes, distinct class colours, ignored pixels black."""

import numpy as np
import pytest
import torch

from m3vit.tasks import IGNORE, get_task
from m3vit.tasks.colors import human_parts_palette, voc_palette


def test_voc_palette_first_entries_and_bit_interleaving():
    palette = voc_palette(300)
    assert palette.dtype == np.uint8 and palette.shape == (300, 3)
    # Independent bit-by-bit construction of the VOC colour of id c.
    for c in (0, 1, 2, 3, 7, 8, 15, 21, 255, 299):
        rgb = [0, 0, 0]
        for k in range(8):
            for channel in range(3):
                if (c >> (3 * k + channel)) & 1:
                    rgb[channel] += 2 ** (7 - k)
        assert tuple(palette[c]) == tuple(rgb), c
    assert tuple(palette[1]) == (128, 0, 0) and tuple(palette[15]) == (192, 128, 128)  # VOC aeroplane, person
    assert len({tuple(c) for c in palette}) == 300


def test_human_parts_palette_is_distinct():
    palette = human_parts_palette(12)
    assert len({tuple(c) for c in palette}) == 12
    assert (0, 0, 0) not in {tuple(c) for c in palette[:7]}  # black stays for ignored pixels


@pytest.mark.parametrize("task_name", ["semseg", "human_parts"])
def test_class_pictures_from_labels_and_logits(task_name):
    task = get_task(task_name)
    h, w = 4, task.channels
    label = torch.arange(task.channels).repeat(h, 1)  # every class once per row
    label[0, 0] = IGNORE
    picture = task.colorize(label)
    assert picture.dtype == np.uint8 and picture.shape == (h, w, 3)
    assert tuple(picture[0, 0]) == (0, 0, 0)
    row = [tuple(c) for c in picture[1]]
    assert len(set(row)) == task.channels  # different classes, different colours
    logits = torch.nn.functional.one_hot(label.clamp(max=task.channels - 1), task.channels).permute(2, 0, 1).float()
    from_logits = task.colorize(logits)
    assert from_logits.shape == (h, w, 3)
    np.testing.assert_array_equal(from_logits[1:], picture[1:])
    np.testing.assert_array_equal(task.colorize(label.numpy()), picture)  # numpy input too


def test_class_picture_rejects_out_of_range_ids_and_bad_kind():
    task = get_task("semseg", num_classes=3)
    with pytest.raises(ValueError, match="class ids"):
        task.colorize(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="kind"):
        task.colorize(torch.tensor([[0, 1]]), kind="logits")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        task.colorize(torch.randn(4, 2, 2))


@pytest.mark.parametrize("task_name", ["sal", "edge"])
def test_binary_pictures(task_name):
    task = get_task(task_name)
    label = torch.tensor([[[0.0, 1.0, IGNORE]]])
    picture = task.colorize(label)
    assert picture.dtype == np.uint8 and picture.shape == (1, 3, 3)
    assert picture[0, :, 0].tolist() == [0, 255, 0]
    logits = torch.tensor([[[-20.0, 0.0, 20.0]]])
    probs = task.colorize(logits)
    assert probs[0, :, 0].tolist() == [0, 128, 255] and (probs[..., 0] == probs[..., 2]).all()
    # The same 0/1 map forced to be read as logits is sigmoid(0) and sigmoid(1), not black and white.
    assert task.colorize(label[..., :2], kind="pred")[0, :, 0].tolist() == [128, 186]


def test_normals_picture():
    task = get_task("normals")
    label = torch.zeros(3, 1, 3)
    label[:, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    label[:, 0, 1] = torch.tensor([-1.0, 0.0, 0.0])
    label[:, 0, 2] = IGNORE
    picture = task.colorize(label)
    assert picture.dtype == np.uint8 and picture.shape == (1, 3, 3)
    assert picture[0, 0].tolist() == [128, 128, 255] and picture[0, 1].tolist() == [0, 128, 128]
    assert picture[0, 2].tolist() == [0, 0, 0]
    # An unnormalised prediction is drawn as its direction.
    np.testing.assert_array_equal(task.colorize(label[:, :, :2] * 5), picture[:, :2])


def test_depth_picture_uses_valid_range_and_blacks_out_ignored():
    import matplotlib

    task = get_task("depth")
    depth = torch.tensor([[[1.0, 2.0, 3.0, IGNORE]]])
    picture = task.colorize(depth)
    assert picture.dtype == np.uint8 and picture.shape == (1, 4, 3)
    viridis = matplotlib.colormaps["viridis"]
    assert picture[0, 0].tolist() == list(viridis(0.0, bytes=True)[:3])
    assert picture[0, 2].tolist() == list(viridis(1.0, bytes=True)[:3])
    assert picture[0, 3].tolist() == [0, 0, 0]
    fixed = task.colorize(depth, vmin=0.0, vmax=4.0)
    assert fixed[0, 0].tolist() == list(viridis(0.25, bytes=True)[:3])
    with pytest.raises(ValueError, match="colour map"):
        task.colorize(depth, cmap="no-such-map")
