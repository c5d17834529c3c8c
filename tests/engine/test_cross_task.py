"""Training-only cross-task modules: the official task-attention module (TAM) against its equations in
float64, its levels on the heads' stage outputs, and in the trainer: trained, never saved into the
model, restored on resume, options checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from m3vit.engine.config import ConfigError
from m3vit.engine.cross_task import TaskAttention, TaskAttentionModule
from m3vit.engine.trainer import train

F64 = torch.float64

# The official TamModule's concatenation weights, as written out per task count in its code
# (models/models.py:66-73 of VITA-Group/M3ViT): task i's feature is multiplied by a·B + c·(1 - B).
OFFICIAL_BALANCE = {
    2: [(1, 0), (0, 1)],
    3: [(1, 0), (0, 0.5), (0, 0.5)],
    4: [(0.5, 0), (0.5, 0), (0, 0.5), (0, 0.5)],
    5: [(0.5, 0), (0.5, 0), (0, 1 / 3), (0, 1 / 3), (0, 1 / 3)],
}


def conv_bn_ref(x, block, stride=1, transposed=False):
    """conv (3x3, padding 1) then BatchNorm with running statistics, from the layer's parameters."""
    conv, bn = block[0], block[1]
    if transposed:
        y = F.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1, output_padding=1)
    else:
        y = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[None, :, None, None]


def tam_ref(module, features, tasks):
    """The TAM written from its equations (module docstring / docs/reference.md), float64."""
    f = [features[t] for t in tasks]
    h, w = f[0].shape[-2:]
    x = F.relu(conv_bn_ref(torch.cat(f, 1), module.fuse))
    b = torch.sigmoid(conv_bn_ref(x, module.balance))
    weighted = [fi * (a * b + c * (1 - b)) for fi, (a, c) in zip(f, OFFICIAL_BALANCE[len(f)])]
    y = F.relu(conv_bn_ref(torch.cat(weighted, 1), module.merge))
    y = F.relu(conv_bn_ref(y, module.down[0], stride=2))
    y = F.relu(conv_bn_ref(y, module.down[1], stride=2))
    y = F.relu(conv_bn_ref(y, module.up[0], transposed=True))
    m = torch.sigmoid(conv_bn_ref(y, module.up[1], transposed=True))[..., :h, :w]
    fused = torch.cat([fi * (1 + m) for fi in f], 1)
    out = {}
    for t in tasks:
        z = F.relu(conv_bn_ref(fused, module.task_convs[t]))
        conv = module.task_outputs[t]
        out[t] = F.conv2d(z, conv.weight, conv.bias)
    return out


def randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=F64) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=F64) * 0.1)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
@pytest.mark.parametrize("size", [(8, 12), (6, 10), (5, 7)])  # the last two: not multiples of 4 (map cropped)
def test_tam_matches_its_equations(num_tasks, size):
    torch.manual_seed(num_tasks)
    names = ["semseg", "human_parts", "sal", "normals", "edge"][:num_tasks]
    channels = {t: c for t, c in zip(names, (5, 3, 1, 3, 1))}
    module = TaskAttentionModule(channels, channels=4).double().eval()
    randomise_bn(module, num_tasks)
    features = {t: torch.randn(2, 4, *size, dtype=F64) for t in names}
    with torch.no_grad():
        got = module(features)
        expected = tam_ref(module, features, names)
    for t in names:
        assert got[t].shape == (2, channels[t], *size)
        torch.testing.assert_close(got[t], expected[t], rtol=1e-10, atol=1e-12)


def test_tam_generalises_the_balance_weights_beyond_five_tasks():
    names = ["a", "b", "c", "d", "e", "f", "g"]  # first ⌊7/2⌋ = 3 tasks get B / 3, the other 4 (1 - B) / 4
    module = TaskAttentionModule({t: 1 for t in names}, channels=2).double().eval()
    captured = {}
    module.merge.register_forward_pre_hook(lambda m, args: captured.update(inputs=args[0]))
    features = {t: torch.ones(1, 2, 4, 4, dtype=F64) for t in names}
    with torch.no_grad():
        module(features)
        b = torch.sigmoid(module.balance(F.relu(module.fuse(torch.cat(list(features.values()), 1)))))
    chunks = captured["inputs"].split(2, dim=1)
    for i, chunk in enumerate(chunks):
        torch.testing.assert_close(chunk, b / 3 if i < 3 else (1 - b) / 4)


def test_tam_needs_two_tasks_and_levels_read_the_next_stage():
    with pytest.raises(ValueError, match="at least two tasks"):
        TaskAttentionModule({"semseg": 3}, channels=4)
    tam = TaskAttention({"semseg": 3, "depth": 1}, channels=4, levels=[0, 2]).eval()
    stages = {t: [torch.randn(1, 4, 2 * 2**i, 3 * 2**i) for i in range(4)] for t in ("semseg", "depth")}
    with torch.no_grad():
        out = tam(stages, (32, 48))
        direct = tam.modules_by_level["2"]({t: stages[t][3] for t in stages})
    assert len(out) == 2 and out[0]["semseg"].shape == (1, 3, 32, 48) and out[1]["depth"].shape == (1, 1, 32, 48)
    torch.testing.assert_close(out[1]["depth"], F.interpolate(direct["depth"], size=(32, 48), mode="bilinear",
                                                               align_corners=False))
    with pytest.raises(ValueError, match="TAM level 2 needs head stage 3"):
        tam({t: s[:3] for t, s in stages.items()}, (32, 48))


# ----------------------------------------------------------------------------------------------
# In the trainer
# ----------------------------------------------------------------------------------------------

TAM = dict(train__cross_task_head=True, train__cross_task_module="tam", train__tam_levels=[0, 1, 2],
           data__tasks=["semseg", "sal", "depth"])


def test_tam_trains_and_stays_out_of_the_model(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=3, **TAM)
    train(cfg, tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not [k for k in final if "modules_by_level" in k or "tam" in k.lower()]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-2" / "trainer.pt", weights_only=True)
    tam = state["cross_task_head"]
    assert {k.split(".")[1] for k in tam} == {"0", "1", "2"}  # one module per level


def test_tam_is_restored_on_resume(tmp_path, tiny_config):
    """An interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one, TAM
    included: the TAM's gradients feed the backbone, so a re-initialised TAM would change the weights."""
    cfg = tiny_config(train__steps=6, train__schedule="constant", train__checkpoint_every=2, **TAM)
    train(cfg, tmp_path / "full")
    short = tmp_path / "short"
    train(cfg.replace({"train.steps": 4}), short)
    train(cfg, short, resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "full", short))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (torch.load(d / "checkpoints" / "step-6" / "trainer.pt", weights_only=True)["cross_task_head"]
              for d in (tmp_path / "full", short))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("overrides, fragment", [
    (dict(train__tam_levels=[3]), "train.tam_levels: level 3 reads head stage 4 but the model's heads have "
                                  "head_stages=4 (allowed levels 0..2)"),
    (dict(data__tasks=["semseg"]), "train.cross_task_module: tam needs at least two tasks"),
])
def test_tam_options_are_checked_against_the_model(tmp_path, tiny_config, overrides, fragment):
    cfg = tiny_config(train__steps=1, **{**TAM, **overrides})
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train(cfg, tmp_path / "run")
