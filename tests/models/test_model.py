"""MultiTaskModel: task-batched forward equals per-task runs, sparse single-task pathways, sizes, errors."""

import pytest
import torch

import m3vit
from m3vit.models import ConfigError, ModelConfig, MultiTaskModel

TASKS = {"semseg": 5, "depth": 1, "normals": 3}


def tiny(name="m3vit_micro", **kw):
    kw.setdefault("embed_dim", 32)
    kw.setdefault("depth", 4)
    kw.setdefault("num_heads", 2)
    kw.setdefault("num_experts", 6)
    kw.setdefault("top_k", 2)
    kw.setdefault("head_channels", 8)
    kw.setdefault("moe_blocks", (1, 3)) if name.startswith("m3vit") else None
    torch.manual_seed(0)
    return m3vit.create_model(name, TASKS, img_size=(32, 32), **kw)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_all_task_forward_equals_per_task_runs(router):
    model = tiny(router=router).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        together = model(images)
        for task in TASKS:
            alone = model(images, tasks=[task])
            assert list(alone) == [task]
            torch.testing.assert_close(alone[task], together[task], rtol=1e-5, atol=1e-5)
            assert together[task].shape == (2, TASKS[task], 32, 48)


def test_subset_of_tasks_returns_only_those_in_request_order():
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), tasks=["normals", "semseg"])
    assert list(out) == ["normals", "semseg"]


def test_task_dependent_routing_differs_between_tasks():
    model = tiny().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), tasks=["semseg", "depth"])
    routing = model.moe_layers[0].last_routing
    per_task = routing["indices"].reshape(2, -1, routing["indices"].shape[-1])
    assert not torch.equal(per_task[0], per_task[1])
    assert routing["task_ids"].tolist() == [0] * per_task.shape[1] + [1] * per_task.shape[1]


def test_single_task_runs_only_its_pathway():
    """One task: one backbone copy, only that task's router rows used, only its head called."""
    model = tiny().eval()
    called = []
    for name, head in model.heads.items():
        head.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), tasks=["depth"])
    assert called == ["depth"]
    for layer in model.moe_layers:
        assert layer.last_routing["indices"].shape[0] == 2 * (1 + 4)  # B * tokens, not T * B * tokens
        assert set(layer.last_routing["task_ids"].tolist()) == {1}


def test_single_task_gradients_touch_only_its_router_and_head():
    model = tiny()
    model(torch.randn(2, 3, 32, 32), tasks=["depth"])["depth"].sum().backward()
    router_grad = model.moe_layers[0].router.weight.grad
    assert router_grad[1].abs().sum() > 0
    assert router_grad[0].abs().sum() == 0 and router_grad[2].abs().sum() == 0
    assert all(p.grad is None for p in model.heads["semseg"].parameters())


def test_task_batched_training_step_equals_sequential_per_task_steps():
    """Loss and gradients of one batched multi-task pass == sum of per-task passes (BN per head)."""
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    loss = sum(o.square().mean() for o in out.values()) + 0.01 * model.aux_loss()
    loss.backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total = 0.0
    for task in TASKS:
        o = model(images, tasks=[task])[task]
        step = o.square().mean() + 0.01 * model.aux_loss()
        step.backward()
        total += step.item()
    assert loss.item() == pytest.approx(total, rel=1e-5)
    for name, grad in batched.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_aux_loss_is_sum_over_moe_layers_and_zero_for_dense_or_eval():
    model = tiny()
    model(torch.randn(1, 3, 32, 32))
    expected = sum(layer.aux_loss() for layer in model.moe_layers)
    assert model.aux_loss().item() == pytest.approx(expected.item())
    assert model.aux_loss().item() > 0
    model.eval()
    model(torch.randn(1, 3, 32, 32))
    assert model.aux_loss().item() == 0.0
    dense = tiny("mvit_micro")
    dense(torch.randn(1, 3, 32, 32))
    assert dense.aux_loss().item() == 0.0 and dense.moe_layers == []


@pytest.mark.parametrize("size", [(16, 16), (32, 64), (80, 48)])
def test_any_input_size_divisible_by_patch(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert all(o.shape[-2:] == size for o in out.values())


def test_moe_blocks_positions_and_expert_shapes():
    model = m3vit.create_model("m3vit_small", ["semseg"], img_size=(64, 64))
    kinds = [type(b.mlp).__name__ for b in model.backbone.blocks]
    assert kinds == ["Mlp", "MoE"] * 6
    moe = model.moe_layers[0]
    assert (moe.num_experts, moe.top_k, moe.hidden_dim, moe.router_kind) == (16, 4, 384, "multi_gate")
    assert moe.w1.shape == (16, 384, 384) and moe.w2.shape == (16, 384, 384)
    dense = m3vit.create_model("mvit_small", ["semseg"], img_size=(64, 64))
    assert dense.backbone.blocks[1].mlp.fc1.out_features == 1536 and dense.moe_layers == []


def test_registry_sizes():
    expected = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
    for size, (dim, depth, heads) in expected.items():
        for prefix in ("m3vit", "mvit"):
            cfg = m3vit.models.model_config(f"{prefix}_{size}", ["semseg"])
            assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (dim, depth, heads, 16)
            assert cfg.is_moe == (prefix == "m3vit")
    assert set(m3vit.list_models()) >= {f"{p}_{s}" for p in ("m3vit", "mvit") for s in expected}


def test_overrides_apply():
    cfg = m3vit.models.model_config("m3vit_tiny", {"semseg": 40}, img_size=(64, 64), num_experts=8, top_k=2,
                                    expert_ratio=2.0, router="task_conditioned", moe_blocks=[0, 5],
                                    noise_std=1.0, head_channels=32)
    assert (cfg.num_experts, cfg.top_k, cfg.expert_hidden, cfg.router, cfg.moe_blocks) == (8, 2, 384, "task_conditioned", (0, 5))
    assert cfg.tasks == {"semseg": 40} and cfg.head_channels == 32 and cfg.noise_std == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope"), r"unknown model 'nope'; available: \[.*m3vit_small"),
        (dict(tasks=["semseg", "bogus"]), r"unknown task\(s\) \['bogus'\]; known tasks"),
        (dict(top_k=17), r"top_k=17 must be <= num_experts=16"),
        (dict(router="soft"), r"router='soft' is not allowed; choose one of"),
        (dict(img_size=(100, 64)), r"img_size H=100 is not divisible by patch_size=16"),
        (dict(moe_blocks=[12]), r"moe_blocks=\[12\] must be distinct block indices in \[0, 12\)"),
        (dict(num_expert=3), r"unknown model option\(s\) \['num_expert'\]; allowed:"),
        (dict(dispatch="fast"), r"dispatch='fast' is not allowed; choose one of \['auto', 'per_expert', 'batched'\]"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    args = dict(name="m3vit_tiny", tasks=["semseg"], img_size=(64, 64))
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        m3vit.create_model(args.pop("name"), args.pop("tasks"), **args)


def test_bad_inputs_raise_clear_errors():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\], got shape \[1, 4, 32, 32\]"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="image size 33x32 is not divisible by the patch size 16"):
        model(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edge'\]; this model's tasks are"):
        model(torch.randn(1, 3, 32, 32), tasks=["edge"])


def test_config_dict_round_trip():
    cfg = m3vit.models.model_config("m3vit_micro", TASKS, img_size=(64, 32), capacity_factor=1.5)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(MultiTaskModel(again), MultiTaskModel)


def test_bf16_autocast_forward_and_backward():
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = sum(o.float().mean() for o in out.values()) + model.aux_loss()
    loss.backward()
    for task in TASKS:
        torch.testing.assert_close(out[task].float(), reference[task], rtol=0.1, atol=0.1)
    w1 = model.moe_layers[0].w1
    assert w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Official-code options at the model level (docs/reference.md)
# ----------------------------------------------------------------------------------------------


def test_registered_models_carry_the_reference_options():
    moe, dense = (m3vit.models.model_config(n, ["semseg"], img_size=(32, 32)) for n in ("m3vit_micro", "mvit_micro"))
    assert (moe.balance_loss, moe.init, moe.task_embed, moe.pos_embed_resize) == ("reference", "reference", "model",
                                                                                   "bilinear")
    assert dense.pos_embed_resize == "bilinear"
    # the field defaults keep the earlier behaviour (what a config.yaml without these keys meant)
    plain = ModelConfig()
    assert (plain.balance_loss, plain.init, plain.task_embed, plain.pos_embed_resize, plain.pretrained_experts) == (
        "vmoe", "trunc_normal", "layer", "bicubic", "upcycle")


@pytest.mark.parametrize("task_embed", ["model", "layer"])
def test_task_conditioned_parameters_are_one_embedding_mlp_plus_the_gates(task_embed):
    """The official layout: ONE task-embedding MLP (one-hot T -> t -> t, LayerNorm) for the model plus
    one gate over [token; embedding] per MoE layer; ``layer`` has one MLP per MoE layer."""
    T, t, D, E, L = len(TASKS), 8, 32, 6, 2
    model = tiny(router="task_conditioned", task_embed_dim=t, task_embed=task_embed)
    routing = sum(p.numel() for n, p in model.named_parameters()
                  if ".router." in n or n.startswith("backbone.task_embed."))
    embedding = (T * t + t) + (t * t + t) + 2 * t  # Linear(T, t), Linear(t, t), LayerNorm(t)
    gates = L * E * (D + t)
    assert routing == (embedding if task_embed == "model" else L * embedding) + gates
    if task_embed == "model":
        shared = model.backbone.task_embed
        assert all(layer.router.embedding is shared for layer in model.moe_layers)
        assert not any("router.task_embed" in k for k in model.state_dict())
        assert shared[3].eps == 1e-6  # the official LayerNorm(eps=1e-6)
    else:
        assert model.backbone.task_embed is None
        assert len({id(layer.router.embedding) for layer in model.moe_layers}) == L


def test_every_layer_routes_on_token_and_the_one_shared_embedding():
    """Official forward: the embedding of the one-hot task, concatenated to each layer's gate input."""
    model = tiny(router="task_conditioned", task_embed_dim=8).eval()
    x = torch.randn(2, 5, 32)
    for layer in model.moe_layers:
        for task in range(len(TASKS)):
            one_hot = torch.zeros(len(TASKS))
            one_hot[task] = 1.0
            embedding = model.backbone.task_embed(one_hot)
            expected = torch.cat([x, embedding.expand(2, 5, -1)], dim=-1) @ layer.router.gate.weight.t()
            got = layer.router(x, torch.full((2,), task))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_aux_loss_of_any_layer_trains_the_shared_embedding():
    model = tiny(router="task_conditioned", task_embed_dim=8).train()
    model(torch.randn(2, 3, 32, 32))
    model.moe_layers[-1].aux_loss().backward()  # only the last layer's loss
    grad = model.backbone.task_embed[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_reference_gate_init_survives_the_backbone_init(router):
    """The backbone re-initialises every nn.Linear in its blocks; the gates (nn.Linear for two of the
    router kinds) must keep the official U(±1/√E) draw, the experts U(±1/√(D·hidden))."""
    model = tiny(router=router, num_experts=16, top_k=4)
    for layer in model.moe_layers:
        gate = layer.router.weight if router == "multi_gate" else layer.router.gate.weight
        bound = 1 / 16**0.5
        assert gate.abs().max().item() <= bound and gate.abs().max().item() > 0.9 * bound
        assert gate.var().item() == pytest.approx(bound**2 / 3, rel=0.2)
        expert_bound = 1 / (32 * 32) ** 0.5
        assert layer.w1.abs().max().item() <= expert_bound and layer.w2.abs().max().item() <= expert_bound


def test_head_features_leave_outputs_and_state_dict_unchanged():
    model = tiny().eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        plain = model(images)
        outputs, stages = model.forward_with_head_features(images)
    for task in TASKS:
        assert torch.equal(outputs[task], plain[task])
        # stage i: the head's channels at 2^i times the token grid (2 x 3 here)
        assert [tuple(s.shape) for s in stages[task]] == [(2, 8, 2 * 2**i, 3 * 2**i) for i in range(4)]
    keys = [k for k in model.state_dict() if k.startswith("heads.depth.")]
    assert keys[:2] == ["heads.depth.norm.weight", "heads.depth.norm.bias"] and keys[-2:] == [
        "heads.depth.classifier.weight", "heads.depth.classifier.bias"]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_run_time_pos_embed_resize_follows_the_option(mode):
    import torch.nn.functional as F

    model = tiny(pos_embed_resize=mode).eval()
    grid = model.backbone.pos_embed[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 4), mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(1, 12, 32)
    with torch.no_grad():
        x, _ = model.backbone.embed(torch.zeros(1, 3, 48, 64))
        patches, _ = model.backbone.patch_embed(torch.zeros(1, 3, 48, 64))
    torch.testing.assert_close(x[:, 1:] - patches, expected)
