"""MultiTaskModel: task-batched forward equals per-task runs, sparse single-task pathways, sizes, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import m3vit
from m3vit.models import ConfigError, ModelConfig, MultiTaskModel, resample_pos_embed
from m3vit.utils.errors import InputError

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
        (dict(img_size=(100, 64)), r"img_size 100x64 is not divisible by the patch size 16; use multiples of 16"),
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


# Positional embeddings of non-square grids (built at one size, run at another)
# ----------------------------------------------------------------------------------------------
def bicubic_reference(grid: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """float64 loop reference of PyTorch's bicubic resize (align_corners=False, a = -0.75, border
    indices clamped) of ``grid [h, w, D]`` to ``out_size``."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    def taps(out_index, in_size, out_size_):
        source = (out_index + 0.5) * in_size / out_size_ - 0.5
        first = math.floor(source)
        t = source - first
        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        return [(min(max(first - 1 + i, 0), in_size - 1), weights[i]) for i in range(4)]

    h, w, dim = grid.shape
    out = np.zeros((*out_size, dim))
    for y in range(out_size[0]):
        for x in range(out_size[1]):
            for row, wy in taps(y, h, out_size[0]):
                for col, wx in taps(x, w, out_size[1]):
                    out[y, x] += wy * wx * grid[row, col]
    return out


@settings(max_examples=25, deadline=None)
@given(old=st.tuples(st.integers(1, 7), st.integers(1, 7)), new=st.tuples(st.integers(1, 7), st.integers(1, 7)),
       prefix=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_resample_pos_embed_matches_a_float64_reference(old, new, prefix, seed):
    dim = 3
    pos = torch.randn(1, prefix + old[0] * old[1], dim, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    out = resample_pos_embed(pos, new, old, num_prefix=prefix)
    assert out.dtype == torch.float64 and out.shape == (1, prefix + new[0] * new[1], dim)
    assert torch.equal(out[:, :prefix], pos[:, :prefix])
    expected = bicubic_reference(pos[0, prefix:].reshape(*old, dim).numpy(), new).reshape(-1, dim)
    np.testing.assert_allclose(out[0, prefix:].numpy(), expected, rtol=1e-12, atol=1e-12)
    if tuple(new) == tuple(old):
        assert out is pos


def test_resample_pos_embed_square_default_and_errors():
    pos = torch.randn(1, 1 + 16, 4)
    # old_grid=None infers the square grid of ImageNet checkpoints; same result as naming it
    assert torch.equal(resample_pos_embed(pos, (2, 6)), resample_pos_embed(pos, (2, 6), (4, 4)))
    with pytest.raises(InputError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))
    with pytest.raises(InputError, match="is not a 3x5 grid"):
        resample_pos_embed(pos, (4, 4), (3, 5))


NON_SQUARE_BUILDS = [(64, 96), (96, 64), (48, 64), (32, 80)]  # (48, 64) is NYUD's 480x640 shape, scaled


@pytest.fixture(scope="module", params=NON_SQUARE_BUILDS, ids=lambda s: f"{s[0]}x{s[1]}")
def non_square_model(request):
    torch.manual_seed(0)
    return m3vit.create_model("m3vit_micro", {"semseg": 3, "depth": 1}, img_size=request.param, embed_dim=32,
                              depth=2, num_heads=2, moe_blocks=(1,), num_experts=4, top_k=2,
                              head_channels=8, pos_embed_resize="bicubic").eval()  # the reference's mode


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=st.tuples(st.integers(1, 7), st.integers(1, 7)))
def test_a_non_square_model_runs_at_every_size_divisible_by_the_patch(non_square_model, grid):
    model = non_square_model
    size = (16 * grid[0], 16 * grid[1])
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert {t: tuple(o.shape) for t, o in out.items()} == {"semseg": (1, 3, *size), "depth": (1, 1, *size)}
    # the positional embedding used is the stored one resized from the model's own grid
    backbone = model.backbone
    used = backbone.embed(torch.zeros(1, 3, *size))[0] - backbone.cls_token.new_zeros(())
    patches = backbone.patch_embed(torch.zeros(1, 3, *size))[0]
    pos = used[:, 1:] - patches
    stored = backbone.pos_embed[0, 1:].detach().double().reshape(*backbone.grid, -1).numpy()
    expected = bicubic_reference(stored, grid).reshape(1, -1, stored.shape[-1])
    np.testing.assert_allclose(pos.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_transposed_grid_is_resampled_not_reused():
    """Built at 64x96 (grid 4x6) and run at 96x64 (grid 6x4): the same token count, another grid."""
    torch.manual_seed(0)
    model = m3vit.create_model("mvit_micro", {"sal": 1}, img_size=(64, 96), embed_dim=32, depth=1, num_heads=2,
                               head_channels=8, pos_embed_resize="bicubic")
    x = torch.zeros(1, 3, 96, 64)
    pos = model.backbone.embed(x)[0] - torch.cat([model.backbone.cls_token, model.backbone.patch_embed(x)[0]], 1)
    stored = model.backbone.pos_embed[0, 1:].detach().double().reshape(4, 6, -1).numpy()
    expected = bicubic_reference(stored, (6, 4)).reshape(24, -1)
    np.testing.assert_allclose(pos[0, 1:].detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_running_at_the_build_size_uses_the_stored_embedding_unchanged():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, grid = model.backbone.embed(x)
    manual = torch.cat([model.backbone.cls_token.expand(2, -1, -1), model.backbone.patch_embed(x)[0]], 1)
    assert grid == model.backbone.grid and torch.equal(tokens, manual + model.backbone.pos_embed)


# ----------------------------------------------------------------------------------------------
# Empty batches
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared", None])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_empty_outputs(router, training):
    model = tiny(router=router, noise_std=1.0) if router else tiny("mvit_micro")
    model.train(training)
    stats = {name: b.clone() for name, b in model.named_buffers()}
    for tasks in (None, ["depth"]):
        out = model(torch.zeros(0, 3, 64, 64), tasks=tasks)
        expected = {t: (0, TASKS[t], 64, 64) for t in (tasks or TASKS)}
        assert {t: tuple(o.shape) for t, o in out.items()} == expected
        aux = model.aux_loss()
        assert torch.isfinite(aux) and aux.item() == 0.0
    if training:
        sum(o.sum() for o in out.values()).backward()
    # BatchNorm running statistics are untouched (only its num_batches_tracked counter moves)
    assert all(torch.equal(b, stats[name]) for name, b in model.named_buffers() if "num_batches" not in name)


# ----------------------------------------------------------------------------------------------
# Errors a user causes are M3ViTError subclasses
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_input_errors():
    model = tiny().eval()
    for call in (lambda: model(torch.randn(1, 4, 32, 32)), lambda: model(torch.randn(1, 3, 33, 32)),
                 lambda: model(torch.randn(1, 3, 32, 32), tasks=["edge"]), lambda: model.resolve_tasks([])):
        with pytest.raises(InputError):
            call()
    with pytest.raises(ConfigError, match="at least one task"):
        MultiTaskModel(ModelConfig(tasks={}))


@pytest.mark.parametrize("key", ["mlp_ratio", "expert_ratio", "drop_path_rate", "noise_std", "capacity_factor"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_options_reject_nan_and_inf(key, value):
    with pytest.raises(ConfigError, match=f"^{key} must be a finite number"):
        m3vit.models.model_config("m3vit_micro", ["semseg"], (32, 32), **{key: value})


def test_float_options_accept_numeric_strings_and_bound_the_ratios():
    """YAML 1.1 reads 1e-3 as a string; a checkpoint or run config may hold one."""
    cfg = m3vit.models.model_config("m3vit_micro", ["semseg"], (32, 32), noise_std="1e-3", mlp_ratio="2")
    assert cfg.noise_std == 1e-3 and cfg.mlp_ratio == 2.0
    with pytest.raises(ConfigError, match="noise_std must be a finite number, got 'lots'"):
        m3vit.models.model_config("m3vit_micro", ["semseg"], (32, 32), noise_std="lots")
    with pytest.raises(ConfigError, match=r"mlp_ratio must be in \(0, 64\]"):
        m3vit.models.model_config("m3vit_micro", ["semseg"], (32, 32), mlp_ratio=1e9)
    with pytest.raises(ConfigError, match="expert_ratio must be a finite number"):  # an int beyond any float
        m3vit.models.model_config("m3vit_micro", ["semseg"], (32, 32), expert_ratio=10**400)


@pytest.mark.parametrize("size, fragment", [
    ((16000, 16000), "img_size 16000x16000: each side must be <= 4096"),
    ((4096, 16), None),  # one long side is fine: 256 tokens
    ((4096, 4096), "gives 65536 patch tokens; at most 16384"),
    ((2048, 2048), None),
    ((2048, 2064), "gives 16512 patch tokens"),
    ((0, 32), "must be positive"),
    ((32, 33), "is not divisible by the patch size 16; use multiples of 16, e.g. 32x32"),
    ((32.0, 32), "must be (H, W), two positive integers"),
    ("big", "must be (H, W), two positive integers"),
])
def test_one_input_size_rule(size, fragment):
    from m3vit.models.config import MAX_INPUT_SIDE, MAX_INPUT_TOKENS, check_input_size

    assert (MAX_INPUT_SIDE, MAX_INPUT_TOKENS) == (4096, 16384)
    if fragment is None:
        assert check_input_size(size, 16) == tuple(size)
        assert m3vit.models.model_config("m3vit_micro", ["sal"], size).img_size == tuple(size)
        return
    with pytest.raises(ConfigError) as err:
        check_input_size(size, 16)
    assert fragment in str(err.value)
    with pytest.raises(ConfigError) as err:  # the model config applies the same rule before building
        m3vit.models.model_config("m3vit_micro", ["sal"], size)
    assert fragment in str(err.value)


@pytest.mark.parametrize("name,router", [("m3vit_micro", "multi_gate"), ("m3vit_micro", "task_conditioned"),
                                         ("m3vit_micro", "shared"), ("mvit_micro", None)])
def test_forward_features_are_the_tokens_the_heads_read(name, router):
    """``forward_features``: per requested task the backbone tokens ``[B, 1 + h*w, D]``, no head run; each head
    applied to them gives exactly ``forward``'s output, and a single task's tokens are its backbone pass."""
    model = tiny(name, **({} if router is None else {"router": router})).eval()
    called = []
    for task, head in model.heads.items():
        head.register_forward_hook(lambda m, i, o, task=task: called.append(task))
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        features = model.forward_features(images, tasks=["normals", "semseg"])
        assert called == [] and list(features) == ["normals", "semseg"]
        assert all(f.shape == (2, 1 + 2 * 3, 32) for f in features.values())
        outputs = model(images, tasks=["normals", "semseg"])
        for task, tokens in features.items():
            assert torch.equal(model.heads[task](tokens, (2, 3), (32, 48)), outputs[task])
        alone, grid = model.backbone(images, [model.tasks.index("depth")])
        assert grid == (2, 3) and torch.equal(model.forward_features(images, "depth")["depth"], alone[0])
    with pytest.raises(InputError, match="unknown task"):
        model.forward_features(images, ["edge"])
    with pytest.raises(InputError, match="not divisible by the patch size"):
        model.forward_features(torch.randn(1, 3, 30, 32))


def test_moe_block_indices_are_the_configured_blocks():
    from m3vit.models import moe_block_indices

    assert moe_block_indices(tiny(moe_blocks=(0, 3))) == [0, 3]
    assert moe_block_indices(tiny("mvit_micro")) == []
