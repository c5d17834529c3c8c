"""count_flops counts what executes: hand formulas for every component, sparse experts only."""

import pytest
import torch

import m3vit

B, H, W, P = 2, 32, 48, 16
D, DEPTH, HEADS, E, K, HID, CH = 32, 4, 2, 6, 2, 48, 8
TASKS = {"semseg": 5, "depth": 1}


def build(name, **kw):
    args = dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, head_channels=CH, mlp_ratio=4.0)
    if name.startswith("m3vit"):
        args |= dict(moe_blocks=(1, 3), num_experts=E, top_k=K, expert_ratio=HID / D, dispatch="per_expert")
    args |= kw
    return m3vit.create_model(name, TASKS, img_size=(H, W), **args)


def hand_formulas(moe_blocks, copies=1):
    """FLOPs per component for a forward of batch B (2 FLOPs per multiply-accumulate)."""
    n = 1 + (H // P) * (W // P)
    s = B * n  # tokens per backbone copy
    attention = DEPTH * copies * (2 * s * D * 3 * D + 2 * s * D * D + 4 * B * n * n * D)
    dense = (DEPTH - len(moe_blocks)) * copies * 2 * (2 * s * D * 4 * D)
    router = len(moe_blocks) * copies * 2 * s * D * E
    experts = len(moe_blocks) * copies * 2 * (2 * s * K * D * HID)
    patch = 2 * B * (H // P) * (W // P) * D * 3 * P * P
    return dict(patch_embed=patch, attention=attention, dense_mlp=dense, router=router, experts=experts)


def head_flops(out_channels):
    """Four conv3x3 stages (x2 upsampling after each); the 1x1 classifier runs on the last stage's map,
    before its upsampling: a quarter of the pixels of the output map."""
    h, w, c_in, total = H // P, W // P, D, 0
    for _ in range(4):
        total += 2 * B * h * w * CH * c_in * 9
        c_in, h, w = CH, 2 * h, 2 * w
    return total + 2 * B * (h // 2) * (w // 2) * CH * out_channels


def test_moe_components_match_hand_formulas_single_task():
    model = build("m3vit_micro")
    report = m3vit.count_flops(model, (H, W), tasks=["semseg"], batch_size=B)
    expected = hand_formulas((1, 3))
    for comp, flops in expected.items():
        assert report.by_component[comp] * 1e9 == pytest.approx(flops, rel=1e-9), comp
    assert report.by_component["decoder"] * 1e9 == pytest.approx(head_flops(5), rel=1e-9)
    assert report.by_component["other"] == pytest.approx(0.0, abs=1e-12)
    assert report.gmacs == pytest.approx(report.gflops / 2)
    n = 1 + (H // P) * (W // P)
    assert report.attention_matmul_gflops * 1e9 == pytest.approx(DEPTH * 4 * B * n * n * D)


def test_all_tasks_count_one_backbone_copy_per_task_and_every_head():
    model = build("m3vit_micro", router="multi_gate")
    report = m3vit.count_flops(model, (H, W), batch_size=B)
    one = hand_formulas((1, 3), copies=1)
    two = hand_formulas((1, 3), copies=2)
    # block 0 (before the first MoE block) runs once, blocks 1..3 once per task
    assert report.by_component["experts"] * 1e9 == pytest.approx(two["experts"])
    assert report.by_component["attention"] * 1e9 == pytest.approx(one["attention"] / DEPTH * (1 + 2 * (DEPTH - 1)))
    assert report.by_component["decoder"] * 1e9 == pytest.approx(head_flops(5) + head_flops(1))
    assert set(report.by_task) == set(TASKS)
    assert report.by_task["depth"]["by_component"]["decoder"] * 1e9 == pytest.approx(head_flops(1))


def test_dense_model_has_no_router_or_expert_flops_and_equal_active_compute():
    dense = build("mvit_micro", mlp_ratio=K * HID / D)
    moe = build("m3vit_micro", mlp_ratio=K * HID / D)
    rd = m3vit.count_flops(dense, (H, W), tasks=["semseg"], batch_size=B)
    rm = m3vit.count_flops(moe, (H, W), tasks=["semseg"], batch_size=B)
    assert rd.by_component["router"] == 0 and rd.by_component["experts"] == 0
    # top-k experts of width HID == one dense MLP of width k*HID: MoE adds only the router
    assert (rm.gflops - rd.gflops) * 1e9 == pytest.approx(hand_formulas((1, 3))["router"], rel=1e-9)


def test_capacity_drops_reduce_counted_expert_flops():
    model = build("m3vit_micro", capacity_factor=0.5)
    report = m3vit.count_flops(model, (H, W), tasks=["semseg"], batch_size=B)
    assert 0 < report.by_component["experts"] * 1e9 < hand_formulas((1, 3))["experts"]
    kept = sum(sum(layer.last_routing["counts"]) for layer in model.moe_layers)
    assert report.by_component["experts"] * 1e9 == pytest.approx(2 * 2 * kept * D * HID)


def test_mode_is_restored_and_errors_are_clear():
    model = build("m3vit_micro").train()
    m3vit.count_flops(model, (H, W))
    assert model.training
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m3vit.count_flops(model, (H + 1, W))
    with pytest.raises(ValueError, match="unknown task"):
        m3vit.count_flops(model, (H, W), tasks=["edge"])


def test_batched_dispatch_counts_its_padding_rows():
    """The batched strategy computes every queue padded to the longest: those FLOPs are counted."""
    model = build("m3vit_micro", dispatch="batched")
    report = m3vit.count_flops(model, (H, W), tasks=["semseg"], batch_size=B)
    padded_rows = sum(sum(1 for c in layer.last_routing["counts"] if c) * max(layer.last_routing["counts"])
                      for layer in model.moe_layers)
    assert report.by_component["experts"] * 1e9 == pytest.approx(2 * 2 * padded_rows * D * HID)
    assert report.by_component["experts"] * 1e9 >= hand_formulas((1, 3))["experts"]
