"""Learning-rate schedules against their closed forms; optimizer parameter groups; the data-order sampler."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.engine.builders import build_model
from m3vit.engine.config import ConfigError
from m3vit.engine.distributed import GlobalBatchSampler, epoch_permutation
from m3vit.engine.schedules import LRSchedule, StepScheduler, build_optimizer, param_groups


def closed_form(kind, lr, min_lr, total, warmup, power, step):
    """The schedule written out directly (module docstring of m3vit.engine.schedules)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))  # held at the end past the last step
    if kind == "poly":
        return min_lr + (lr - min_lr) * (1 - p) ** power
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2


schedules = st.tuples(
    st.sampled_from(["poly", "cosine", "constant"]),
    st.floats(1e-5, 1.0), st.floats(0.0, 1.0), st.integers(1, 500), st.integers(0, 50), st.floats(0.1, 3.0),
)


@settings(max_examples=200, deadline=None)
@given(schedules, st.integers(0, 600))
def test_schedule_matches_closed_form(spec, step):
    kind, lr, min_frac, total, warmup, power = spec
    min_lr = lr * min_frac
    schedule = LRSchedule(lr=lr, total_steps=total, kind=kind, warmup_steps=warmup, power=power, min_lr=min_lr)
    assert schedule(step) == pytest.approx(closed_form(kind, lr, min_lr, total, warmup, power, step), rel=1e-12, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(schedules)
def test_schedule_shape(spec):
    kind, lr, min_frac, total, warmup, power = spec
    min_lr = lr * min_frac
    schedule = LRSchedule(lr=lr, total_steps=total, kind=kind, warmup_steps=warmup, power=power, min_lr=min_lr)
    values = [schedule(s) for s in range(total)]
    ramp, rest = values[:warmup], values[warmup:]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))  # warmup rises linearly ...
    if 0 < warmup <= total:
        assert ramp[-1] == pytest.approx(lr)  # ... to the base rate (a run shorter than its warmup stops early)
    if rest:
        assert rest[0] == pytest.approx(lr)  # decay starts at the base rate
        assert all(b <= a + 1e-15 for a, b in zip(rest, rest[1:]))  # and never rises
        assert all(min_lr - 1e-12 <= v <= lr + 1e-12 for v in rest)


def test_schedule_reference_values():
    # poly 0.9 of the reference recipe: lr * (1 - s/T)^0.9; cosine halfway = (lr + min_lr) / 2
    poly = LRSchedule(lr=0.002, total_steps=100, kind="poly", power=0.9)
    assert poly(0) == pytest.approx(0.002) and poly(50) == pytest.approx(0.002 * 0.5 ** 0.9)
    cosine = LRSchedule(lr=1.0, total_steps=20, kind="cosine", warmup_steps=10, min_lr=0.2)
    assert cosine(4) == pytest.approx(0.5) and cosine(15) == pytest.approx(0.6)


def test_schedule_rejects_bad_values():
    with pytest.raises(ConfigError, match="train.min_lr"):
        LRSchedule(lr=0.1, total_steps=10, min_lr=0.5)
    with pytest.raises(ConfigError, match="train.schedule"):
        LRSchedule(lr=0.1, total_steps=10, kind="step")
    with pytest.raises(ValueError):
        LRSchedule(lr=0.1, total_steps=10)(-1)


def test_step_scheduler_sets_groups_and_round_trips():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    schedule = LRSchedule(lr=1.0, total_steps=10, kind="poly", warmup_steps=2)
    sched = StepScheduler(opt, schedule)
    seen = []
    for _ in range(5):
        seen.append(sched.apply())
        assert sched.get_last_lr() == [seen[-1]] * 2
        sched.step()
    assert seen == [schedule(s) for s in range(5)]
    other = StepScheduler(opt, schedule)
    other.load_state_dict(sched.state_dict())
    assert other.apply() == schedule(5)


def test_param_groups_exclude_norms_biases_and_embeddings(tiny_cfg):
    model = build_model(tiny_cfg, {"semseg": 3, "depth": 1})
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    assert sorted(decay["names"] + no_decay["names"]) == sorted(named)  # a partition of every parameter
    for name in no_decay["names"]:
        leaf = name.rsplit(".", 1)[-1]
        assert named[name].ndim <= 1 or leaf in ("pos_embed", "cls_token", "b1", "b2"), name
    for name in decay["names"]:
        assert named[name].ndim >= 2 and not name.endswith(("bias", "pos_embed", "cls_token", ".b1", ".b2")), name
    # hand-picked members of each group
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
            "backbone.blocks.1.mlp.b1", "heads.semseg.stages.0.1.weight", "heads.depth.classifier.bias"} <= set(no_decay["names"])
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.w1", "backbone.blocks.1.mlp.router.weight",
            "heads.semseg.stages.0.0.weight", "backbone.patch_embed.proj.weight"} <= set(decay["names"])


def test_build_optimizer_kinds(tiny_config):
    cfg = tiny_config(train__optimizer="sgd", train__momentum=0.8, train__weight_decay=0.01, train__lr=0.5)
    model = build_model(cfg, {"sal": 1})
    opt = build_optimizer(cfg.train, model)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["momentum"] == 0.8 and g["lr"] == 0.5 for g in opt.param_groups)
    cfg = tiny_config(train__optimizer="adamw", train__betas=[0.8, 0.95])
    opt = build_optimizer(cfg.train, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.95)


# --- the official recipe: lr set once per epoch, weight decay on every parameter ----------------


def official_poly_lr(base_lr: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    """``adjust_learning_rate`` of the official code: ``lr * (1 - epoch / epochs) ** 0.9`` at each epoch start."""
    return base_lr * (1 - epoch / epochs) ** power


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(1, 12), steps_per_epoch=st.integers(1, 9), lr=st.floats(1e-4, 1.0))
def test_epoch_updates_equal_the_official_poly_schedule(epochs, steps_per_epoch, lr):
    schedule = LRSchedule(lr=lr, total_steps=epochs * steps_per_epoch, kind="poly", power=0.9, update="epoch",
                          steps_per_epoch=steps_per_epoch)
    for step in range(epochs * steps_per_epoch):
        expected = official_poly_lr(lr, step // steps_per_epoch, epochs)
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_epoch_updates_hold_the_rate_within_an_epoch_and_step_updates_do_not():
    epoch = LRSchedule(lr=1.0, total_steps=12, kind="cosine", update="epoch", steps_per_epoch=4)
    step = LRSchedule(lr=1.0, total_steps=12, kind="cosine")
    assert [epoch(s) for s in range(12)] == [step(s) for s in (0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8)]
    warm = LRSchedule(lr=1.0, total_steps=12, kind="poly", warmup_steps=2, update="epoch", steps_per_epoch=4)
    assert [warm(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]  # warmup stays per step, then held at p = 0


def test_epoch_updates_need_the_steps_per_epoch():
    with pytest.raises(ConfigError, match=r"train.lr_update: 'epoch' needs the steps per epoch"):
        LRSchedule(lr=0.1, total_steps=10, update="epoch")
    with pytest.raises(ConfigError, match=r"train.lr_update: 'daily' is not allowed"):
        LRSchedule(lr=0.1, total_steps=10, update="daily")


def test_trainer_schedule_uses_the_sampler_epoch(tiny_config):
    cfg = tiny_config(train__lr_update="epoch")  # 16 samples, batch 4: 4 steps per epoch
    schedule = LRSchedule.from_config(cfg.train, 12, steps_per_epoch=4)
    assert (schedule.update, schedule.steps_per_epoch) == ("epoch", 4)
    assert schedule(3) == schedule(0) and schedule(4) < schedule(3)


def test_weight_decay_on_every_parameter_as_officially(tiny_config):
    cfg = tiny_config(train__optimizer="sgd", train__weight_decay=1e-4, train__weight_decay_exclude="none")
    model = build_model(cfg, {"semseg": 3, "depth": 1})
    decay, no_decay = param_groups(model, 1e-4, exclude="none")
    assert sorted(decay["names"]) == sorted(n for n, _ in model.named_parameters()) and no_decay["names"] == []
    opt = build_optimizer(cfg.train, model)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="train.weight_decay_exclude: 'all' is not allowed"):
        param_groups(model, 1e-4, exclude="all")


# --- data order --------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3), st.integers(0, 10))
def test_sampler_shards_the_global_batches_of_one_process(length, batch, world, epoch, seed):
    if length < batch * world:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            GlobalBatchSampler(length, batch, seed, 0, world)
        return
    single = GlobalBatchSampler(length, batch * world, seed)
    single.set_epoch(epoch)
    ranks = [GlobalBatchSampler(length, batch, seed, r, world) for r in range(world)]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    expected = list(single)
    per_rank = [list(s) for s in ranks]
    steps = length // (batch * world)
    assert len(expected) == steps * batch * world and all(len(r) == steps * batch for r in per_rank)
    for step in range(steps):  # the union of the ranks' step batches is the single process's batch
        merged = sum((r[step * batch:(step + 1) * batch] for r in per_rank), [])
        assert merged == expected[step * batch * world:(step + 1) * batch * world]
    assert len(set(expected)) == len(expected)  # no sample twice in an epoch
    order = epoch_permutation(length, seed, epoch)
    assert sorted(order.tolist()) == list(range(length)) and expected == order[:len(expected)].tolist()


def test_sampler_epochs_differ_and_resume_mid_epoch():
    sampler = GlobalBatchSampler(40, 4, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start=3)
    assert list(sampler) == first[12:] and len(sampler) == len(first) - 12
    assert not np.array_equal(epoch_permutation(40, 3, 0), epoch_permutation(40, 4, 0))
