"""Loading DeiT/timm-format ViT weights: exact mapping, expert rule, interpolation, errors."""

import pytest
import torch
import torch.nn.functional as F

import m3vit
from m3vit.models import ConfigError, load_pretrained_vit

DIM, DEPTH, HEADS, GRID = 32, 4, 2, 4  # checkpoint trained at 64x64 with patch 16


def timm_state_dict(dim=DIM, depth=DEPTH, grid=GRID, mlp_ratio=4, distilled=False, seed=0):
    """A random state dict in the timm VisionTransformer key layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hidden = mlp_ratio * dim
    prefix = 2 if distilled else 1
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, prefix + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim), "norm.bias": r(dim), "head.weight": r(1000, dim), "head.bias": r(1000)}
    if distilled:
        sd["dist_token"] = r(1, 1, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
               p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
               p + "norm2.weight": r(dim), p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(hidden, dim),
               p + "mlp.fc1.bias": r(hidden), p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)}
    return sd


def make(name="m3vit_micro", img=(64, 64), **kw):
    args = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, head_channels=8)
    if name.startswith("m3vit"):
        args |= dict(moe_blocks=(1, 3), num_experts=8, top_k=4, expert_ratio=1.0)
    args |= kw
    return m3vit.create_model(name, ["semseg", "depth"], img_size=img, **args)


def test_dense_model_maps_exactly_and_matches_a_reference_vit(tmp_path):
    sd = {k: v.double() for k, v in timm_state_dict().items()}
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    model = make("mvit_micro").double()
    report = load_pretrained_vit(model, path)
    assert report["ignored"] == ["head.bias", "head.weight"]
    own = model.state_dict()
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.2.attn.qkv.weight", "blocks.3.mlp.fc2.bias"]:
        assert torch.equal(own["backbone." + key], sd[key]), key
    assert torch.equal(own["heads.depth.norm.weight"], sd["norm.weight"])

    # An independent timm-style ViT forward from the raw state dict gives the same final features.
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"], t], 1) + sd["pos_embed"]
    for i in range(DEPTH):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(t, (DIM,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(1, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, -1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(1, -1, DIM), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (DIM,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    model.eval()
    with torch.no_grad():
        ours, _ = model.backbone(x)
    torch.testing.assert_close(ours[0], t, rtol=1e-9, atol=1e-9)


def test_split_rule_reproduces_dense_mlp_when_one_expert_per_slice_has_weight_one(tmp_path):
    sd = timm_state_dict()
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(path))
    model = make()
    report = load_pretrained_vit(model, path)
    assert report["rule"] == {"name": "split", "slices": 4}
    moe = model.moe_layers[0]  # block 1
    x = torch.randn(5, DIM)
    dense = F.linear(F.gelu(F.linear(x, sd["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.bias"])),
                     sd["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.bias"])
    for experts in ([0, 1, 2, 3], [4, 1, 6, 3]):  # one expert from each of the 4 slices
        out = sum(F.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e] for e in experts)
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_upcycle_rule_copies_the_dense_mlp_into_every_expert():
    sd = timm_state_dict()
    model = make(expert_ratio=4.0)
    assert load_pretrained_vit(model, sd)["rule"] == {"name": "upcycle", "slices": 1}
    moe = model.moe_layers[1]  # block 3
    for e in range(moe.num_experts):
        assert torch.equal(moe.w1[e], sd["blocks.3.mlp.fc1.weight"].t())
        assert torch.equal(moe.b2[e], sd["blocks.3.mlp.fc2.bias"])


def bilinear_ref(grid, out_h, out_w):
    """Bilinear resize of ``grid [h, w, D]`` with pixel centres (align_corners=False), float64 loops:
    source coordinate ``(i + 0.5) * in / out - 0.5`` clamped at 0, neighbours clamped at the border."""
    grid = grid.double()
    h, w, _ = grid.shape

    def taps(i, n_in, n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(x)
        return i0, min(i0 + 1, n_in - 1), x - i0

    out = torch.zeros(out_h, out_w, grid.shape[-1], dtype=torch.float64)
    for i in range(out_h):
        r0, r1, a = taps(i, h, out_h)
        for j in range(out_w):
            c0, c1, b = taps(j, w, out_w)
            out[i, j] = ((1 - a) * (1 - b) * grid[r0, c0] + (1 - a) * b * grid[r0, c1]
                         + a * (1 - b) * grid[r1, c0] + a * b * grid[r1, c1])
    return out


def test_pos_embed_interpolated_and_distillation_token_dropped():
    """Registered models resize bilinearly, as the official code does (docs/reference.md)."""
    sd = timm_state_dict(distilled=True)
    model = make(img=(96, 128))  # grid 6x8 from a 4x4 checkpoint
    assert model.config.pos_embed_resize == "bilinear"
    load_pretrained_vit(model, sd)
    pos = model.backbone.pos_embed
    assert pos.shape == (1, 1 + 6 * 8, DIM)
    assert torch.equal(pos[0, 0], sd["pos_embed"][0, 0])  # cls position kept, dist position dropped
    expected = bilinear_ref(sd["pos_embed"][0, 2:].reshape(4, 4, DIM), 6, 8).reshape(1, 48, DIM)
    torch.testing.assert_close(pos[:, 1:].double(), expected, atol=1e-5, rtol=1e-5)


def test_pos_embed_bicubic_option():
    sd = timm_state_dict()
    model = make(img=(96, 128), pos_embed_resize="bicubic")
    load_pretrained_vit(model, sd)
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 48, DIM)
    torch.testing.assert_close(model.backbone.pos_embed[:, 1:], expected)
    assert not torch.allclose(expected, bilinear_ref(grid[0].permute(1, 2, 0), 6, 8).reshape(1, 48, DIM).float())


def test_pretrained_experts_init_keeps_the_experts_and_reports_the_dense_mlps_ignored():
    sd = timm_state_dict()
    torch.manual_seed(0)
    model = make(pretrained_experts="init")
    before = {k: v.clone() for k, v in model.state_dict().items() if ".mlp.w" in k or ".mlp.b" in k}
    report = load_pretrained_vit(model, sd)
    after = model.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert "blocks.1.mlp.fc1.weight" in report["ignored"] and "blocks.0.mlp.fc1.weight" in report["loaded"]
    assert report["rule"] == {"name": "init", "slices": 0}
    # the dense blocks and the attention still load
    assert torch.equal(model.backbone.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize(
    "sd_kwargs, model_kwargs, match",
    [
        (dict(dim=48), {}, r"'patch_embed.proj.weight' has shape \[48, 3, 16, 16\] but the model's"),
        (dict(depth=6), {}, "pretrained checkpoint has 6 blocks but the model has depth=4"),
        (dict(mlp_ratio=3), dict(mlp_ratio=3.0, expert_ratio=2.0), "cannot initialise experts of hidden size 64 from a dense MLP of hidden size 96"),
    ],
)
def test_mismatches_raise_clear_errors(sd_kwargs, model_kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_pretrained_vit(make(**model_kwargs), timm_state_dict(**sd_kwargs))


def test_missing_key_and_unreadable_file(tmp_path):
    sd = timm_state_dict()
    del sd["blocks.2.attn.proj.bias"]
    with pytest.raises(ConfigError, match="has no 'blocks.2.attn.proj.bias'"):
        load_pretrained_vit(make(), sd)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_vit(make(), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch or safetensors checkpoint"):
        load_pretrained_vit(make(), bad)


def test_create_model_pretrained_argument(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm_state_dict(), path)
    model = m3vit.create_model("m3vit_micro", ["semseg"], img_size=(64, 64), pretrained=path, embed_dim=DIM,
                               depth=DEPTH, num_heads=HEADS, moe_blocks=(1, 3), num_experts=8, head_channels=8)
    assert torch.equal(model.backbone.cls_token, timm_state_dict()["cls_token"])


def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path):
    from m3vit.utils.errors import CheckpointError

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage" * 3)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    for path, fragment in [(bad, "is not a PyTorch or safetensors checkpoint"), (broken, "as a safetensors file"), (listing, "state dict"),
                           (tmp_path, "is a directory")]:
        with pytest.raises(CheckpointError) as err:
            load_pretrained_vit(make(), path)
        assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_m3vit_checkpoint_given_as_pretrained_is_named_as_one(tmp_path):
    """An m3vit checkpoint's weights hold backbone.* keys, not a ViT's blocks.N.*: the error says what the file is."""
    from m3vit.utils.errors import CheckpointError

    weights = m3vit.save_checkpoint(make(), tmp_path / "ckpt") / "model.safetensors"
    with pytest.raises(CheckpointError) as err:
        load_pretrained_vit(make(), weights)
    message = str(err.value)
    assert message.startswith(f"pretrained checkpoint {str(weights)!r} holds no ViT backbone weights") and "\n" not in message
    assert "is an m3vit checkpoint's weights" in message and "--checkpoint" in message and "DeiT/ViT" in message
    with pytest.raises(CheckpointError, match=r"^the pretrained state dict holds no ViT backbone weights \(no "
                                              r"'blocks.N.\*' keys[^\n]*DeiT/ViT checkpoint$") as err:
        load_pretrained_vit(make(), {"fc.weight": torch.zeros(2, 2)})
    assert "m3vit checkpoint" not in str(err.value)


def test_a_file_that_is_not_a_checkpoint_says_so_in_one_line(tmp_path):
    """torch.load's own messages advise weights_only=False (never m3vit's advice) and span lines."""
    import pickle

    import numpy as np

    from m3vit.utils.errors import CheckpointError

    good = tmp_path / "good.pth"
    torch.save(timm_state_dict(depth=1), good)
    files = {"config.yaml": (b"format: m3vit-checkpoint\nversion: 1\n", "neither a torch.save archive nor a pickle"),
             "config.pth": (b"model: {name: m3vit_micro}\n", "neither a torch.save archive nor a pickle"),
             "random.pt": (bytes(range(256)) * 4, "neither a torch.save archive nor a pickle"),
             "empty.pth": (b"", "it is empty"),
             "truncated.pth": (good.read_bytes()[:200], "a damaged or foreign zip archive"),
             "plain.pkl": (pickle.dumps({"a": 1}), "Python objects besides tensors"),
             "legacy_truncated.pt": (pickle.dumps({"a": 1}, protocol=2)[:5], "")}
    objects = tmp_path / "objects.pth"
    torch.save({"model": timm_state_dict(depth=1), "args": np.zeros(2)}, objects)
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
    for path, reason in [(tmp_path / n, why) for n, (_, why) in files.items()] + [(objects, "Python objects besides tensors")]:
        with pytest.raises(CheckpointError) as err:
            load_pretrained_vit(make(), path)
        message = str(err.value)
        assert message.startswith(f"{str(path)!r} is not a PyTorch or safetensors checkpoint of tensors ("), message
        assert reason in message and "\n" not in message and "weights_only" not in message, message
        assert message.endswith("give a DeiT/ViT weights file holding only tensors (.pth, .pt, .bin or .safetensors)")
