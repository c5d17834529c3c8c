"""Attention, pre-norm blocks, stochastic depth and the SETR-PUP head against float64 hand references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.nn import Attention, Block, DropPath, MoE, Mlp, SETRPUPHead

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def gelu_ref(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def layer_norm_ref(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def attention_ref(attn: Attention, x):
    """Per image, per head: ``softmax(q k^T / sqrt(d_head)) v``, heads concatenated, then ``proj``."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    d = dim // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    if b is None:
        b = torch.zeros(3 * dim, dtype=x.dtype)
    out = torch.zeros_like(x)
    for i in range(batch):
        q_all = x[i] @ w[:dim].t() + b[:dim]
        k_all = x[i] @ w[dim : 2 * dim].t() + b[dim : 2 * dim]
        v_all = x[i] @ w[2 * dim :].t() + b[2 * dim :]
        per_head = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = q_all[:, cols], k_all[:, cols], v_all[:, cols]
            scores = q @ k.t() / math.sqrt(d)
            scores = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            probs = scores / scores.sum(dim=1, keepdim=True)
            per_head.append(probs @ v)
        out[i] = torch.cat(per_head, dim=1) @ attn.proj.weight.t() + attn.proj.bias
    return out


def mlp_ref(mlp: Mlp, x):
    return gelu_ref(x @ mlp.fc1.weight.t() + mlp.fc1.bias) @ mlp.fc2.weight.t() + mlp.fc2.bias


def moe_multi_gate_ref(moe: MoE, x, task_ids):
    """Top-k multi-gate MoE, token by token (unnormalised picked softmax probabilities)."""
    batch, tokens, dim = x.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        for n in range(tokens):
            token = x[b, n]
            logits = moe.router.weight[int(task_ids[b])] @ token
            probs = torch.softmax(logits, dim=0)
            picked = sorted(range(moe.num_experts), key=lambda e: -float(probs[e]))[: moe.top_k]
            for e in picked:
                hidden = gelu_ref(token @ moe.w1[e] + moe.b1[e])
                out[b, n] = out[b, n] + probs[e] * (hidden @ moe.w2[e] + moe.b2[e])
    return out


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 4),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 9),
    qkv_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_attention_matches_manual_softmax_attention(heads, head_dim, batch, tokens, qkv_bias, seed):
    dim = heads * head_dim
    attn = randomize(Attention(dim, heads, qkv_bias=qkv_bias).double(), seed).eval()
    x = rand(batch, tokens, dim, seed=seed)
    with torch.no_grad():
        out = attn(x)
        expected = attention_ref(attn, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_attention_gradients_match_reference():
    attn = randomize(Attention(6, 2).double(), 3)
    x = rand(2, 5, 6, seed=3).requires_grad_(True)
    probe = rand(2, 5, 6, seed=4)
    leaves = [x] + list(attn.parameters())
    got = torch.autograd.grad((attn(x) * probe).sum(), leaves)
    expected = torch.autograd.grad((attention_ref(attn, x) * probe).sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_attention_rejects_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"embed_dim=10.*num_heads=3"):
        Attention(10, 3)


def test_attention_is_permutation_equivariant_over_tokens():
    attn = randomize(Attention(8, 2).double(), 5).eval()
    x = rand(1, 6, 8, seed=5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Mlp, DropPath, Block
# ----------------------------------------------------------------------------------------------


def test_mlp_matches_linear_gelu_linear():
    mlp = randomize(Mlp(5, 7).double(), 1).eval()
    x = rand(2, 3, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp_ref(mlp, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_drop_path_is_identity_in_eval(p):
    x = rand(4, 3, 5)
    assert torch.equal(DropPath(p).eval()(x), x)


def test_drop_path_with_zero_probability_is_identity_in_training():
    x = rand(8, 3, 5)
    torch.manual_seed(0)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_training_drops_whole_samples_and_rescales():
    p = 0.5
    x = rand(64, 3, 5) + 10.0  # no zeros in x
    torch.manual_seed(0)
    out = DropPath(p).train()(x)
    dropped = kept = 0
    for i in range(64):
        if torch.equal(out[i], torch.zeros_like(out[i])):
            dropped += 1
        else:
            torch.testing.assert_close(out[i], x[i] / (1 - p), rtol=1e-12, atol=0)
            kept += 1
    assert dropped > 0 and kept > 0


def test_drop_path_with_probability_one_drops_everything():
    """p = 1 must give zeros (every branch dropped), not 0/0 = NaN."""
    x = rand(4, 3, 5)
    out = DropPath(1.0).train()(x)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_block_with_dense_mlp_is_pre_norm_residual(qkv_bias):
    dim, heads = 6, 3
    block = randomize(Block(dim, heads, Mlp(dim, 10), qkv_bias=qkv_bias).double(), 7).eval()
    x = rand(2, 5, dim, seed=7)
    with torch.no_grad():
        h = x + attention_ref(block.attn, layer_norm_ref(x, block.norm1.weight, block.norm1.bias, 1e-6))
        expected = h + mlp_ref(block.mlp, layer_norm_ref(h, block.norm2.weight, block.norm2.bias, 1e-6))
        out = block(x)
    assert not block.is_moe
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_block_drop_path_is_inactive_in_eval():
    dim = 4
    block = randomize(Block(dim, 2, Mlp(dim, 8), drop_path=0.9).double(), 8)
    plain = Block(dim, 2, Mlp(dim, 8), drop_path=0.0).double()
    plain.load_state_dict(block.state_dict())
    x = rand(3, 4, dim, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_block_with_moe_passes_task_ids_to_the_moe():
    dim = 4
    moe = MoE(dim, 6, num_experts=4, top_k=2, num_tasks=3, router="multi_gate")
    block = randomize(Block(dim, 2, moe).double(), 9).eval()
    x = rand(3, 5, dim, seed=9)
    task_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        h = x + attention_ref(block.attn, layer_norm_ref(x, block.norm1.weight, block.norm1.bias, 1e-6))
        normed = layer_norm_ref(h, block.norm2.weight, block.norm2.bias, 1e-6)
        expected = h + moe_multi_gate_ref(block.mlp, normed, task_ids)
        out = block(x, task_ids)
        other_task = block(x, 0)
    assert block.is_moe
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(out, other_task)


# ----------------------------------------------------------------------------------------------
# SETR-PUP head
# ----------------------------------------------------------------------------------------------


def bilinear_ref(x, size):
    """Plain-loop bilinear resize, ``align_corners=False`` (half-pixel centres, clamped at the border)."""
    out = torch.zeros(*x.shape[:2], *size, dtype=x.dtype)
    in_h, in_w = x.shape[-2:]

    def taps(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        return lo, hi, src - lo

    for r in range(size[0]):
        r0, r1, fr = taps(r, in_h, size[0])
        for c in range(size[1]):
            c0, c1, fc = taps(c, in_w, size[1])
            out[..., r, c] = ((1 - fr) * ((1 - fc) * x[..., r0, c0] + fc * x[..., r0, c1])
                              + fr * ((1 - fc) * x[..., r1, c0] + fc * x[..., r1, c1]))
    return out


def head_ref(head: SETRPUPHead, tokens, grid, out_size):
    """Eval-mode SETR-PUP in the original order: LayerNorm, tokens laid out row-major on the grid,
    conv-BN-ReLU-up2 stages, the 1x1 classifier on the fully upsampled map, a final resize (plain
    loops for the layout and every bilinear resize)."""
    batch, _, dim = tokens.shape
    normed = layer_norm_ref(tokens, head.norm.weight, head.norm.bias, 1e-6)
    x = torch.zeros(batch, dim, grid[0], grid[1], dtype=tokens.dtype)
    for b in range(batch):
        for r in range(grid[0]):
            for c in range(grid[1]):
                x[b, :, r, c] = normed[b, 1 + r * grid[1] + c]
    for stage in head.stages:
        conv, bn = stage[0], stage[1]
        x = F.conv2d(x, conv.weight, padding=1)
        x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        x = torch.clamp(x * bn.weight[:, None, None] + bn.bias[:, None, None], min=0)
        x = bilinear_ref(x, (2 * x.shape[-2], 2 * x.shape[-1]))
    x = F.conv2d(x, head.classifier.weight, head.classifier.bias)
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = bilinear_ref(x, out_size)
    return x


def make_head(dim=6, out_channels=3, channels=5, stages=2, seed=0):
    head = randomize(SETRPUPHead(dim, out_channels, channels=channels, stages=stages).double(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for stage in head.stages:
        bn = stage[1]
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen, dtype=F64) + 0.5)
    return head.eval()


@pytest.mark.parametrize(
    "grid,stages,out_size",
    [
        ((2, 2), 4, (32, 32)),     # 16 * grid
        ((2, 3), 4, (32, 48)),     # non-square grid
        ((3, 2), 4, (40, 30)),     # out size not a multiple of the grid
        ((1, 1), 2, (7, 5)),       # upsample then downsample
        ((2, 4), 1, (4, 8)),       # one stage, exact
        ((3, 3), 3, (50, 50)),
    ],
)
def test_setr_head_output_shape(grid, stages, out_size):
    head = make_head(stages=stages)
    tokens = rand(2, 1 + grid[0] * grid[1], 6)
    with torch.no_grad():
        out = head(tokens, grid, out_size)
    assert out.shape == (2, 3, *out_size)


@pytest.mark.parametrize("grid,stages,out_size", [((2, 3), 2, (8, 12)), ((3, 2), 2, (10, 9)), ((2, 2), 1, (4, 4))])
def test_setr_head_matches_reference(grid, stages, out_size):
    head = make_head(stages=stages, seed=3)
    tokens = rand(2, 1 + grid[0] * grid[1], 6, seed=3)
    with torch.no_grad():
        out = head(tokens, grid, out_size)
        expected = head_ref(head, tokens, grid, out_size)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (8, 6), (7, 2), (1, 1), (13, 9)])
def test_bilinear_ref_matches_interpolate(size):
    x = rand(2, 3, 3, 4, seed=5)
    torch.testing.assert_close(bilinear_ref(x, size), F.interpolate(x, size=size, mode="bilinear", align_corners=False),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid,stages,out_size", [((2, 3), 3, (16, 24)), ((3, 2), 2, (13, 7)), ((1, 2), 1, (2, 4))])
def test_setr_head_classifier_before_last_upsample_equals_original_order(grid, stages, out_size):
    """The classifier now runs before the last x2 upsampling (as the reference head does): equal, in
    float64, to classifying the upsampled map, with a bias and more classes than channels."""
    head = make_head(stages=stages, out_channels=7, channels=4, seed=11)
    with torch.no_grad():
        head.classifier.bias.copy_(torch.arange(7, dtype=F64) - 3.0)
    tokens = rand(2, 1 + grid[0] * grid[1], 6, seed=11)
    seen = []
    hook = head.classifier.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        out = head(tokens, grid, out_size)
    hook.remove()
    last_stage = (grid[0] * 2 ** (stages - 1), grid[1] * 2 ** (stages - 1))
    assert seen == [last_stage]  # 4x fewer pixels than the upsampled map
    torch.testing.assert_close(out, head_ref(head, tokens, grid, out_size), rtol=1e-10, atol=1e-12)


def test_setr_head_float32_within_tolerance_and_layouts():
    """float32: equal to the original order within float tolerance; the prediction is a plain NCHW
    tensor, the stage features channels_last; gradients (eval-mode BatchNorm) match the reference."""
    head = make_head(dim=8, out_channels=3, channels=16, stages=2, seed=12)
    tokens = rand(1, 1 + 12, 8, seed=12)
    with torch.no_grad():
        expected = head_ref(head, tokens, (3, 4), (12, 16))
    head32, tokens32 = head.float(), tokens.float()
    with torch.no_grad():
        out, features = head32.forward_stages(tokens32, (3, 4), (12, 16))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)

    head64 = head.double()
    t = tokens.clone().requires_grad_(True)
    weight = rand(1, 3, 12, 16, seed=13)
    (head64(t, (3, 4), (12, 16)) * weight).sum().backward()
    grads = [t.grad] + [p.grad.clone() for p in head64.parameters()]
    head64.zero_grad()
    t2 = tokens.clone().requires_grad_(True)
    (head_ref(head64, t2, (3, 4), (12, 16)) * weight).sum().backward()
    for got, want in zip(grads, [t2.grad] + [p.grad for p in head64.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_setr_head_ignores_cls_token():
    head = make_head(stages=2, seed=4)
    tokens = rand(2, 1 + 6, 6, seed=4)
    changed = tokens.clone()
    changed[:, 0] = rand(2, 6, seed=99) * 100
    with torch.no_grad():
        a = head(tokens, (2, 3), (9, 13))
        b = head(changed, (2, 3), (9, 13))
        c = head(tokens[:, [0, 1, 2, 3, 4, 6, 5]], (2, 3), (9, 13))  # swap two patch tokens
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kwargs,pattern", [(dict(out_channels=0), "out_channels"), (dict(out_channels=2, stages=0), "stages")])
def test_setr_head_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SETRPUPHead(6, **kwargs)
