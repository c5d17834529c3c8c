"""Expert usage: counts against a plain loop over router logits captured by hooks, forced routing,
overlap properties (hypothesis) and the written heatmaps / JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from m3vit.data import SyntheticScenes
from m3vit.analysis.experts import ExpertUsage, expert_usage, plot_heatmaps, write_usage
from m3vit.models import create_model, moe_block_indices

TASKS = {"semseg": 8, "sal": 1, "depth": 1}
MICRO = dict(embed_dim=32, depth=3, num_heads=2, head_channels=8, num_experts=4)


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes("val", size=(32, 32), length=3, seed=0, tasks=list(TASKS))


def _model(router="multi_gate", top_k=2, moe_blocks=(0, 2), seed=0):
    torch.manual_seed(seed)
    return create_model("m3vit_micro", TASKS, img_size=(32, 32), moe_blocks=list(moe_blocks), top_k=top_k,
                        router=router, **MICRO).eval()


def _router_hooks(model, adjust=None):
    """Record every router call as (layer, task ids [B], logits [B, N, E]); ``adjust(layer, task_ids, logits)``
    may return changed logits (to force routing)."""
    calls = []
    handles = []
    for l_idx, layer in enumerate(model.moe_layers):
        def hook(module, inputs, output, l_idx=l_idx):
            task_ids = inputs[1]  # one task may come as an int (MoE.route passes it through)
            if isinstance(task_ids, int):
                task_ids = torch.full((output.shape[0],), task_ids, dtype=torch.long)
            logits = output if adjust is None else adjust(l_idx, task_ids, output)
            calls.append((l_idx, task_ids.clone(), logits.detach().clone()))
            return logits
        handles.append(layer.router.register_forward_hook(hook))
    return calls, handles


def _usage_with_forced_experts(model, scenes, expert_of_task: dict):
    """``expert_usage`` with each task's router pushed (+100 on one logit) to ``expert_of_task[task id]``."""
    def bias(layer, task_ids, logits):
        out = logits.clone()
        for b, t in enumerate(task_ids.tolist()):
            out[b, :, expert_of_task[t]] += 100.0
        return out

    _, handles = _router_hooks(model, bias)
    try:
        return expert_usage(model, scenes)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_counts_match_a_plain_loop_over_the_router_logits(scenes, router):
    model = _model(router)
    calls, handles = _router_hooks(model)
    try:
        usage = expert_usage(model, scenes, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    task_names = list(TASKS)
    reference = {(l, t): Counter() for l in range(2) for t in task_names}
    for l_idx, task_ids, logits in calls:
        for b in range(logits.shape[0]):
            task = task_names[int(task_ids[b])]
            for token in logits[b].tolist():
                ranked = sorted(range(len(token)), key=lambda e: -token[e])[:model.config.top_k]
                reference[(l_idx, task)].update(ranked)
    for l_idx in range(2):
        for t_idx, task in enumerate(task_names):
            expected = [reference[(l_idx, task)][e] for e in range(4)]
            assert usage.counts[l_idx, t_idx].tolist() == expected, (l_idx, task)
    tokens = 1 + (32 // 16) ** 2
    assert (usage.counts.sum(-1) == len(scenes) * tokens * model.config.top_k).all()
    assert np.allclose(usage.fractions.sum(-1), 1.0)
    assert usage.layers == moe_block_indices(model) == [0, 2]
    assert usage.num_images == 3 and usage.top_k == 2 and usage.num_experts == 4


def test_limit_and_batch_size_do_not_change_the_counts(scenes):
    model = _model()
    whole = expert_usage(model, scenes, batch_size=3)
    assert np.array_equal(expert_usage(model, scenes, batch_size=1).counts, whole.counts)
    first = expert_usage(model, scenes, limit=1)
    assert first.num_images == 1 and first.counts.sum() * 3 == whole.counts.sum()


def test_forced_experts_show_full_usage_and_no_overlap(scenes):
    model = _model(top_k=1)
    forced = {0: 0, 1: 3, 2: 3}  # task id -> expert its router is biased to

    usage = _usage_with_forced_experts(model, scenes, forced)
    for t_idx, expert in forced.items():
        assert (usage.fractions[:, t_idx, expert] == 1.0).all()
        assert np.allclose(usage.mean_gate_weight[:, t_idx, expert], 1.0)
    assert usage.core_experts() == [[[0], [3], [3]]] * 2
    ov = usage.overlap()
    for matrix in (ov.jaccard, ov.shared):
        assert np.allclose(matrix[:, 0, 1], 0) and np.allclose(matrix[:, 0, 2], 0)
        assert np.allclose(matrix[:, 1, 2], 1)
    summary = usage.summary()
    assert summary[0]["most_shared"][0] == {"expert": 3, "tasks": 2}
    text = usage.to_markdown()
    assert "## Block 0" in text and "## Block 2" in text and "- semseg: 1 core expert(s) [0]" in text
    assert "| semseg | 1.00 | 0.00 | 0.00 |" in text and "| sal | 0.00 | 1.00 | 1.00 |" in text
    assert summary[0]["core_experts"] == {"semseg": [0], "sal": [3], "depth": [3]}


def test_a_shared_router_gives_every_task_the_same_usage(scenes):
    usage = expert_usage(_model("shared"), scenes)
    assert (usage.counts == usage.counts[:, :1]).all()
    ov = usage.overlap()
    assert np.allclose(ov.jaccard, 1) and np.allclose(ov.shared, 1)


def test_a_dense_model_is_refused(scenes):
    dense = create_model("mvit_micro", TASKS, img_size=(32, 32), embed_dim=32, depth=2, num_heads=2, head_channels=8)
    with pytest.raises(ValueError, match="has no MoE layer"):
        expert_usage(dense, scenes)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tasks=["bogus"]), "unknown task(s) ['bogus']"),
    (dict(limit=0), "limit must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
])
def test_bad_arguments(scenes, kwargs, fragment):
    with pytest.raises(ValueError) as err:
        expert_usage(_model(), scenes, **kwargs)
    assert fragment in str(err.value)


# ----------------------------------------------------------------------------------------------
# Overlap measures on arbitrary counts
# ----------------------------------------------------------------------------------------------
def _usage(counts: np.ndarray) -> ExpertUsage:
    layers, tasks, experts = counts.shape
    return ExpertUsage(tasks=[f"t{i}" for i in range(tasks)], layers=list(range(layers)), num_experts=experts,
                       top_k=1, num_images=1, counts=counts.astype(np.int64),
                       weight_sums=counts.astype(np.float64) * 0.5)


def _min_core_size(p: np.ndarray, threshold: float) -> int:
    """Brute force: the smallest number of experts whose shares add up to >= threshold."""
    for size in range(1, len(p) + 1):
        if any(p[list(c)].sum() >= threshold - 1e-12 for c in combinations(range(len(p)), size)):
            return size
    raise AssertionError("unreachable")


COUNTS = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.int64, shape, elements=st.integers(0, 50)).filter(lambda a: (a.sum(-1) > 0).all()))


@settings(max_examples=60, deadline=None)
@given(counts=COUNTS, threshold=st.sampled_from([0.5, 0.9, 1.0]))
def test_overlap_properties(counts, threshold):
    usage = _usage(counts)
    ov = usage.overlap(threshold)
    p = usage.fractions
    for matrix in (ov.jaccard, ov.shared):
        assert np.allclose(matrix, matrix.transpose(0, 2, 1))
        assert np.allclose(np.diagonal(matrix, axis1=1, axis2=2), 1)
        assert (matrix >= -1e-12).all() and (matrix <= 1 + 1e-12).all()
    # shared = 1 - total-variation distance
    tv = 0.5 * np.abs(p[:, :, None, :] - p[:, None, :, :]).sum(-1)
    assert np.allclose(ov.shared, 1 - tv)
    # a core is a smallest set of experts covering the threshold, and Jaccard is taken on those sets
    cores = usage.core_experts(threshold)
    for l_idx in range(counts.shape[0]):
        for t_idx in range(counts.shape[1]):
            core = cores[l_idx][t_idx]
            assert p[l_idx, t_idx, core].sum() >= threshold - 1e-9
            assert len(core) == _min_core_size(p[l_idx, t_idx], threshold)
        for i, j in combinations(range(counts.shape[1]), 2):
            a, b = set(cores[l_idx][i]), set(cores[l_idx][j])
            assert ov.jaccard[l_idx, i, j] == pytest.approx(len(a & b) / len(a | b))
    assert np.allclose(usage.fractions.sum(-1), 1)
    assert np.allclose(usage.mean_gate_weight[counts > 0], 0.5)


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold must be in"):
        _usage(np.ones((1, 2, 3))).overlap(0.0)


# ----------------------------------------------------------------------------------------------
# Pictures and JSON
# ----------------------------------------------------------------------------------------------
def test_heatmaps_and_json_are_written(scenes, tmp_path):
    usage = expert_usage(_model(), scenes)
    paths = plot_heatmaps(usage, tmp_path / "out")
    assert [p.name for p in paths] == ["experts_block0.png", "experts_block2.png", "experts_all.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    json_path = write_usage(usage, tmp_path / "out" / "usage.json", extra={"checkpoint": "x"})
    data = json.loads(json_path.read_text())
    assert data["checkpoint"] == "x" and data["tasks"] == list(TASKS)
    assert [layer["block"] for layer in data["layers"]] == [0, 2]
    for l_idx, layer in enumerate(data["layers"]):
        assert [layer["counts"][t] for t in TASKS] == usage.counts[l_idx].tolist()
        assert np.allclose(layer["jaccard"], usage.overlap().jaccard[l_idx])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".m3vit-output.json") == sorted(
        ["experts_block0.png", "experts_block2.png", "experts_all.png", "usage.json"])


def test_a_layer_holding_a_subset_reports_original_expert_ids(scenes):
    """An extracted model (``m3vit export``) holds experts [0, 2, 3] in block 2: usage stays over all 4
    router experts, the removed one gets nothing, and every assignment is counted once."""
    torch.manual_seed(0)
    model = create_model("m3vit_micro", TASKS, img_size=(32, 32), moe_blocks=[0, 2], top_k=2,
                         expert_subsets={2: [0, 2, 3]}, **MICRO).eval()
    usage = expert_usage(model, scenes, ["sal"])
    assert usage.num_experts == 4 and usage.counts.shape == (2, 1, 4)
    assert usage.counts[1, 0, 1] == 0
    tokens = (32 // 16) ** 2 + 1
    assert (usage.counts.sum(-1) == len(scenes) * tokens * 2).all()
    # the held experts' counts equal the held-local indices the layer itself reports
    model(torch.zeros(1, 3, 32, 32), tasks=["sal"])
    local = model.moe_layers[1].last_routing["indices"]
    assert int(local.max()) <= 2


# ----------------------------------------------------------------------------------------------
# Task–expert mutual information
# ----------------------------------------------------------------------------------------------
def _mi_loop(counts: np.ndarray) -> list[float]:
    """Plain float64 loops over the joint assignment frequencies, per layer."""
    out = []
    for layer in counts.tolist():
        total = float(sum(sum(row) for row in layer))
        p_t = [sum(row) / total for row in layer]
        p_e = [sum(layer[t][e] for t in range(len(layer))) / total for e in range(len(layer[0]))]
        mi = 0.0
        for t, row in enumerate(layer):
            for e, c in enumerate(row):
                if c:
                    joint = c / total
                    mi += joint * math.log2(joint / (p_t[t] * p_e[e]))
        out.append(mi)
    return out


@settings(max_examples=60, deadline=None)
@given(counts=COUNTS)
def test_mutual_information_matches_a_float64_loop(counts):
    mi = _usage(counts).mutual_information()
    assert mi.shape == (counts.shape[0],)
    assert np.allclose(mi, _mi_loop(counts), atol=1e-12)
    bound = min(math.log2(counts.shape[1]), math.log2(counts.shape[2]))
    assert (mi >= 0).all() and (mi <= bound + 1e-12).all()


@pytest.mark.parametrize("counts, expected", [
    ([[[5, 5, 10], [1, 1, 2], [2, 2, 4]]], 0.0),                       # every task in the same proportions
    ([[[7, 0, 0, 0], [0, 7, 0, 0], [0, 0, 3, 4]]], math.log2(3)),     # three tasks, disjoint experts, equal weights
    ([[[4, 0], [0, 4]]], 1.0),
    ([[[3, 1], [1, 3]]], 0.75 * math.log2(1.5) - 0.25),                # hand computed: 2·(3/8)·log2(3/2) + 2·(1/8)·log2(1/2)
    ([[[2, 0], [0, 6]]], -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))),  # disjoint, tasks weighted 1:3: H(T)
])
def test_mutual_information_hand_computed(counts, expected):
    assert _usage(np.array(counts)).mutual_information()[0] == pytest.approx(expected, abs=1e-12)


def test_mutual_information_of_routed_models(scenes):
    assert np.allclose(expert_usage(_model("shared"), scenes).mutual_information(), 0.0, atol=1e-12)
    model = _model(top_k=1)

    usage = _usage_with_forced_experts(model, scenes, {0: 0, 1: 3, 2: 3})  # semseg -> 0, sal and depth -> 3
    entropy_of_experts = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert np.allclose(usage.mutual_information(), entropy_of_experts)
    data = usage.to_dict()
    assert [layer["mutual_information"] for layer in data["layers"]] == pytest.approx([entropy_of_experts] * 2)
    assert data["summary"][0]["mutual_information"] == pytest.approx(entropy_of_experts)
    assert "task–expert mutual information: 0.918 bits" in usage.to_markdown()
