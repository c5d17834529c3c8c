"""Evaluator: single-task pathways score like the all-task forward, predictions are upsampled to each
label's resolution (checked against closed-form bilinear values), ``limit`` and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from m3vit.data import SyntheticScenes, eval_transforms, preprocess
from m3vit.engine import builders
from m3vit.engine.evaluator import evaluate
from m3vit.models import ModelConfig, create_model
from m3vit.utils.errors import DataError

TASKS = ["semseg", "human_parts", "sal", "normals", "edge", "depth"]
MICRO = dict(embed_dim=32, depth=2, num_heads=2, head_channels=8, num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes("val", size=(32, 32), length=4, seed=0)


def _eval_cfg(tiny_config):
    return tiny_config().eval  # edge metric with 3 thresholds: fast


@pytest.mark.parametrize("name, options", [
    ("m3vit_micro", dict(MICRO, moe_blocks=[0, 1], router="multi_gate")),
    ("m3vit_micro", dict(MICRO, moe_blocks=[1], router="task_conditioned")),
    ("mvit_micro", dict(MICRO, moe_blocks=[])),
], ids=["multi_gate", "task_conditioned", "dense"])
def test_single_task_pathways_equal_the_all_task_forward(scenes, tiny_config, name, options):
    torch.manual_seed(0)
    model = create_model(name, scenes.task_channels, img_size=(32, 32), **options).eval()
    eval_cfg = _eval_cfg(tiny_config)
    single = evaluate(model, scenes, batch_size=3, eval_cfg=eval_cfg, pathway="single")
    together = evaluate(model, scenes, batch_size=3, eval_cfg=eval_cfg, pathway="all")
    assert set(single) == set(TASKS)
    for task in TASKS:
        assert single[task].keys() == together[task].keys()
        for metric, value in single[task].items():
            assert value == pytest.approx(together[task][metric], abs=1e-6), (task, metric)


def test_outputs_of_a_task_do_not_depend_on_the_other_tasks(scenes):
    """The property the equality above rests on, at the output level: a task's pathway run alone gives
    the same maps as inside the task-batched forward."""
    torch.manual_seed(1)
    model = create_model("m3vit_micro", scenes.task_channels, img_size=(32, 32), moe_blocks=[0, 1], **MICRO).eval()
    images = preprocess([scenes[i]["image"] for i in range(2)], (32, 32))
    with torch.no_grad():
        together = model(images)
        for task in TASKS:
            torch.testing.assert_close(model(images, tasks=[task])[task], together[task], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Upsampling to the label resolution, against closed-form values
# ----------------------------------------------------------------------------------------------
class RampModel(nn.Module):
    """A stand-in model whose predictions are horizontal ramps of the input column index.

    Bilinear upsampling (align_corners=False) of a ramp ``v(j) = j`` from width ``w`` to ``W`` has the
    closed form ``clamp((x + 0.5) * w / W - 0.5, 0, w - 1)`` at output column ``x``, which the test
    uses as the independent reference. depth = 1 + ramp; semseg logits: class 1 wins where the ramp
    exceeds ``w / 2``, class 0 elsewhere (class 2 never).
    """

    def __init__(self, img_size=(32, 32)):
        super().__init__()
        self.config = ModelConfig(name="ramp", tasks={"semseg": 3, "depth": 1}, img_size=img_size)
        self.tasks = list(self.config.tasks)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen_shapes: list[tuple[int, ...]] = []

    def resolve_tasks(self, tasks):
        tasks = list(self.tasks if tasks is None else tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this model's tasks are {self.tasks}")
        return tasks

    def forward(self, images, tasks=None):
        self.seen_shapes.append(tuple(images.shape))
        b, _, h, w = images.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(b, 1, h, w)
        out = {"depth": 1.0 + ramp,
               "semseg": torch.cat([torch.zeros_like(ramp), ramp - w / 2, torch.full_like(ramp, -1e3)], dim=1)}
        return {t: out[t] for t in self.resolve_tasks(tasks)}


class BigLabels:
    """Two samples whose labels are larger than the model input and differ in size per sample."""

    tasks = ("semseg", "depth")
    task_channels = {"semseg": 3, "depth": 1}

    def __init__(self, sizes=((48, 64), (40, 56))):
        g = torch.Generator().manual_seed(0)
        self.samples = []
        for h, w in sizes:
            depth = 1 + 30 * torch.rand(1, h, w, generator=g)
            depth[0, :3, :5] = 255  # unknown depth
            semseg = torch.randint(0, 3, (h, w), generator=g)
            semseg[-2:, :] = 255  # ignored
            self.samples.append({"image": torch.rand(3, 20 + h // 4, 30, generator=g), "semseg": semseg,
                                 "depth": depth})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _upsampled_ramp(w_in: int, w_out: int) -> np.ndarray:
    x = np.arange(w_out, dtype=np.float64)
    return np.clip((x + 0.5) * w_in / w_out - 0.5, 0, w_in - 1)


def _expected(dataset, w_in: int) -> dict[str, float]:
    sq, n = 0.0, 0
    confusion = np.zeros((3, 3), dtype=np.int64)
    for sample in dataset.samples:
        h, w = sample["semseg"].shape
        ramp = np.broadcast_to(_upsampled_ramp(w_in, w), (h, w))
        gt = sample["depth"][0].numpy().astype(np.float64)
        valid = gt != 255
        sq += float((((1 + ramp) - gt)[valid] ** 2).sum())
        n += int(valid.sum())
        pred = (ramp > w_in / 2).astype(np.int64)  # argmax of [0, ramp - w/2, -1000]
        label = sample["semseg"].numpy()
        keep = label != 255
        np.add.at(confusion, (label[keep], pred[keep]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return {"rmse": float(np.sqrt(sq / n)), "mIoU": float(iou.mean() * 100),
            "pixel_acc": float(tp.sum() / confusion.sum() * 100)}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_predictions_are_upsampled_bilinearly_to_each_label(batch_size):
    dataset = BigLabels()
    model = RampModel(img_size=(32, 32))
    metrics = evaluate(model, dataset, batch_size=batch_size)
    expected = _expected(dataset, 32)
    assert metrics["depth"]["rmse"] == pytest.approx(expected["rmse"], rel=1e-6)
    assert metrics["semseg"]["mIoU"] == pytest.approx(expected["mIoU"], rel=1e-6)
    assert metrics["semseg"]["pixel_acc"] == pytest.approx(expected["pixel_acc"], rel=1e-6)
    # every image reached the model resized to its img_size (the images are 32..30 and 30 wide)
    assert {s[1:] for s in model.seen_shapes} == {(3, 32, 32)}


def test_same_size_labels_in_one_batch_and_a_custom_input_size():
    dataset = BigLabels(sizes=((48, 64), (48, 64)))
    model = RampModel(img_size=(16, 32))
    metrics = evaluate(model, dataset, batch_size=2, size=(16, 32))
    expected = _expected(dataset, 32)
    assert metrics["depth"]["rmse"] == pytest.approx(expected["rmse"], rel=1e-6)
    assert metrics["semseg"]["mIoU"] == pytest.approx(expected["mIoU"], rel=1e-6)
    assert model.seen_shapes == [(2, 3, 16, 32)] * 2  # one forward per task (single pathways)


class RecordingModel(RampModel):
    """``RampModel`` that keeps every input batch it sees."""

    def forward(self, images, tasks=None):
        self.seen = getattr(self, "seen", []) + [images.clone()]
        return super().forward(images, tasks)


def test_the_network_sees_what_the_training_resize_gives():
    """Images larger than the input are shrunk with antialiasing, smaller ones enlarged, exactly as the
    evaluation transform (``Resize`` + ``Normalize``) does to a training sample."""
    dataset = BigLabels(sizes=((48, 64), (160, 64)))  # images 32x30 (enlarged) and 60x30 (shrunk)
    model = RecordingModel(img_size=(32, 32))
    evaluate(model, dataset, ["depth"], batch_size=2)
    (batch,) = model.seen
    rng = np.random.default_rng(0)
    for i, sample in enumerate(dataset.samples):
        expected = eval_transforms((32, 32))({"image": sample["image"]}, rng)["image"]
        assert torch.equal(batch[i], expected)


# ----------------------------------------------------------------------------------------------
# limit, training mode, bad input
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(scenes):
    torch.manual_seed(2)
    return create_model("m3vit_micro", scenes.task_channels, img_size=(32, 32), moe_blocks=[1], **MICRO).eval()


def test_limit_scores_the_first_samples(small_model, scenes, tiny_config):
    eval_cfg = _eval_cfg(tiny_config)
    tasks = ["semseg", "depth", "normals"]
    first_two = SyntheticScenes("val", size=(32, 32), length=2, seed=0)
    limited = evaluate(small_model, scenes, tasks, limit=2, batch_size=4, eval_cfg=eval_cfg)
    assert limited == evaluate(small_model, first_two, tasks, batch_size=4, eval_cfg=eval_cfg)
    assert limited != evaluate(small_model, scenes, tasks, batch_size=4, eval_cfg=eval_cfg)
    # a limit past the end scores everything
    assert evaluate(small_model, scenes, tasks, limit=100) == evaluate(small_model, scenes, tasks)


def test_the_models_training_mode_is_restored(small_model, scenes):
    small_model.train()
    try:
        evaluate(small_model, scenes, ["depth"], limit=1)
        assert small_model.training
    finally:
        small_model.eval()


def test_builders_give_a_dataset_the_model_fits(tiny_config):
    cfg = tiny_config()
    dataset = builders.build_eval_dataset(cfg)
    model = builders.build_model(cfg, dataset.task_channels)
    metrics = evaluate(model, dataset, ["sal", "edge"], eval_cfg=cfg.eval, limit=2)
    assert set(metrics) == {"sal", "edge"} and set(metrics["edge"]) == {"odsF", "oisF", "AP"}
    assert all(0 <= v <= 100 for task in metrics.values() for v in task.values())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tasks=["bogus"]), "unknown task(s) ['bogus']; this model's tasks are"),
    (dict(pathway="both"), "pathway must be 'single' or 'all'"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(limit=0), "limit must be >= 1"),
])
def test_bad_arguments(small_model, scenes, kwargs, fragment):
    with pytest.raises(ValueError) as err:
        evaluate(small_model, scenes, **kwargs)
    assert fragment in str(err.value)


def test_a_task_the_dataset_has_no_labels_for(small_model):
    depth_only = SyntheticScenes("val", size=(32, 32), length=1, tasks=["depth"])
    with pytest.raises(DataError, match=r"no labels for task\(s\) \['semseg'\]; it provides \['depth'\]"):
        evaluate(small_model, depth_only, ["semseg", "depth"])


# ----------------------------------------------------------------------------------------------
# --protocol reference: what the official evaluation scores, on hand-made predictions
# ----------------------------------------------------------------------------------------------


def _logit(p255: float) -> float:
    p = p255 / 255
    return float(np.log(p / (1 - p)))


class HandModel(nn.Module):
    """Fixed predictions, whatever the image: saliency probabilities (×255) per image, one normal and
    a two-class score pair per side (see ``test_reference_protocol_on_hand_made_predictions``)."""

    SAL = [[89.7, 76.8], [95.4, 80.4]]  # 255·p of image 0 and 1, two pixels each

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(name="hand", tasks={"sal": 1, "normals": 3, "semseg": 2}, img_size=(1, 2))
        self.tasks = list(self.config.tasks)
        self.dummy = nn.Parameter(torch.zeros(()))

    def resolve_tasks(self, tasks):
        return list(self.tasks if tasks is None else tasks)

    def forward(self, images, tasks=None):
        b = images.shape[0]
        index = torch.round((images[:, 0, 0, 0] * 0.229 + 0.485) * 10).long().tolist()  # HandLabels' image i is i / 10
        sal = torch.tensor([[[[_logit(v) for v in self.SAL[i]]]] for i in index])
        normals = torch.tensor([0.0, 0.28, 0.96]).view(1, 3, 1, 1).expand(b, 3, 1, 2).clone()
        semseg = torch.tensor([[1.0, 0.0], [0.0, 4.0]]).t().reshape(1, 2, 1, 2).expand(b, 2, 1, 2).clone()
        out = {"sal": sal, "normals": normals, "semseg": semseg}
        return {t: out[t] for t in self.resolve_tasks(tasks)}


class HandLabels:
    tasks = ("sal", "normals", "semseg")

    def __init__(self):
        normals = torch.full((3, 1, 2), 255.0)
        normals[:, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # pixel 1 is unlabelled
        self.samples = [{"image": torch.full((3, 1, 2), i / 10), "sal": torch.tensor([[[1.0, 0.0]]]),
                         "normals": normals, "semseg": torch.tensor([[0, 0, 1, 1]])} for i in range(2)]  # semseg 1x4

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.samples[i]


def test_reference_protocol_on_hand_made_predictions():
    """Worked by hand (thresholds 0.20, 0.25, ..., 0.90):

    saliency, label [1, 0] in both images. Official 8-bit maps q = floor(255 p): image 0 [89, 76] ->
    [0.349, 0.298], image 1 [95, 80] -> [0.373, 0.314]. IoU per image at t = 0.20/0.25: 1/2, 1/2;
    t = 0.30: 1 (0.349 > 0.3 > 0.298), 1/2; t = 0.35: 0, 1; t >= 0.40: 0, 0 -> mean per threshold
    max = 3/4: mIoU 75.0. On the float probabilities [0.3518, 0.3012] and [0.3741, 0.3153] both images
    reach IoU 1 at t = 0.35: mIoU 100.0.

    normals, one labelled pixel (0, 0, 1), prediction (0, 0.28, 0.96): float angle acos(0.96) =
    16.2602°; official PNG q = floor(255 (n + 1) / 2) = (127, 163, 249), read back 2q/255 - 1 =
    (-1, 71, 243) / 255, angle acos(243 / √(1 + 71² + 243²)) = 16.2889°.

    semseg, label [0, 0, 1, 1] (1 x 4) from scores left (1, 0) and right (0, 4) (1 x 2): the official
    argmax-then-nearest map [0, 0, 1, 1] is perfect (mIoU 100); the bilinear scores give [0, 1, 1, 1]
    (column 1: 0.75 (1, 0) + 0.25 (0, 4) = (0.75, 1)): IoU 1/2 and 2/3, mIoU 58.33, accuracy 75.
    """
    model, data = HandModel(), HandLabels()
    reference = evaluate(model, data, size=(1, 2), batch_size=2, protocol="reference")
    default = evaluate(model, data, size=(1, 2), batch_size=2)
    assert reference["sal"]["mIoU"] == pytest.approx(75.0, abs=1e-9)
    assert default["sal"]["mIoU"] == pytest.approx(100.0, abs=1e-9)
    assert reference["normals"]["mean"] == pytest.approx(16.28889316189586, abs=1e-9)
    assert default["normals"]["mean"] == pytest.approx(16.260204708311967, abs=1e-5)  # float32 prediction
    assert reference["semseg"]["mIoU"] == pytest.approx(100.0) and reference["semseg"]["pixel_acc"] == 100.0
    assert default["semseg"]["mIoU"] == pytest.approx(700 / 12) and default["semseg"]["pixel_acc"] == 75.0
    # one image at a time gives the same
    assert evaluate(model, data, size=(1, 2), batch_size=1, protocol="reference") == reference
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(model, data, size=(1, 2), protocol="official")


def test_reference_resizes_are_opencvs():
    """The official code resizes with OpenCV: INTER_NEAREST for label maps, INTER_LINEAR (then
    astype(uint8)) for saliency and normals PNGs."""
    cv2 = pytest.importorskip("cv2")
    from m3vit.tasks import get_task
    from m3vit.tasks.base import quantize_8bit

    g = np.random.default_rng(0)
    for (h, w), (H, W) in [((8, 10), (13, 17)), ((12, 9), (7, 5)), ((5, 6), (5, 6))]:
        values = g.uniform(0, 255, (h, w)).astype(np.float32)
        expected = cv2.resize(values, (W, H), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
        got = quantize_8bit(torch.from_numpy(values)[None, None], (H, W))[0, 0].numpy()
        assert (np.abs(got - expected) <= 1).all() and (got == expected).mean() > 0.98  # float32 vs float64 ties
        scores = torch.from_numpy(g.normal(size=(1, 4, h, w)).astype(np.float32))
        labels = scores[0].argmax(0).numpy().astype(np.uint8)
        official = cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST)
        ours = get_task("semseg", num_classes=4).reference_prediction(scores, (H, W)).argmax(1)[0].numpy()
        np.testing.assert_array_equal(ours, official)
