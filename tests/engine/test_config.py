"""Run configs: shipped files load and carry the reference recipe, overrides parse as YAML, every bad
key or value is one ConfigError naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.engine.config import ConfigError, RunConfig, apply_overrides, load_config, parse_overrides
from m3vit.models import model_config

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "m3vit" / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
# A small valid model so that model-option tests do not depend on the default size.
SMALL = {"model.name": "m3vit_micro", "data.size": [32, 32]}


def test_the_issue_configs_are_shipped():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert {"synthetic/m3vit_tiny.yaml", "synthetic/mvit_tiny.yaml", "pascal_context/m3vit_small.yaml",
            "pascal_context/mvit_small.yaml", "pascal_context/m3vit_small_task_conditioned.yaml",
            "nyud/m3vit_small.yaml", "nyud/mvit_small.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # what the file says is what the config holds (spot-check the keys checks rely on)
    assert cfg.model.name == raw["model"]["name"]
    assert list(cfg.data.size) == raw["data"]["size"]
    assert cfg.train.batch_size == raw["train"]["batch_size"]
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    # the model it describes can be configured for its tasks
    tasks = {t: 2 for t in (cfg.data.tasks or ["semseg"])}
    model_config(cfg.model.name, tasks, img_size=cfg.data.size, **cfg.model_overrides())


@pytest.mark.parametrize("dataset, tasks, size, weights", [
    ("pascal_context", ["semseg", "human_parts", "sal", "normals", "edge"], (512, 512),
     {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0}),
    ("nyud", None, (480, 640), None),
])
@pytest.mark.parametrize("model", ["m3vit_small", "mvit_small"])
def test_reference_recipe(dataset, tasks, size, weights, model):
    """The recipe of the paper (DESIGN.md): SGD 0.9, lr 0.002, wd 1e-4, poly 0.9, 100 epochs, batch 8,
    gate loss 0.01, gate noise 0."""
    cfg = load_config(CONFIGS / dataset / f"{model}.yaml")
    t = cfg.train
    recipe = (t.optimizer, t.momentum, t.lr, t.weight_decay, t.schedule, t.poly_power)
    assert recipe == ("sgd", 0.9, 0.002, 1e-4, "poly", 0.9)
    assert (t.epochs, t.steps, t.batch_size, t.aux_weight) == (100, None, 8, 0.01)
    assert cfg.model.name == model and tuple(cfg.data.size) == size and cfg.data.name == dataset
    assert cfg.model.options.get("noise_std", 0.0) == 0.0
    if tasks is not None:
        assert cfg.data.tasks == tasks
    if weights is not None:
        assert t.loss_weights == weights
    elif t.loss_weights is not None:
        assert t.loss_weights["semseg"] == 1.0 and t.loss_weights["depth"] == 1.0
    # the official code's recipe details (docs/reference.md): decay on every parameter, poly lr set
    # once per epoch, the dataset's own augmentation, the training-only TAM (PASCAL 2 levels, NYUD 3)
    assert (t.weight_decay_exclude, t.lr_update, cfg.data.scale_rotate) == ("none", "epoch", "reference")
    assert (t.cross_task_head, t.cross_task_module, t.cross_task_weight) == (True, "tam", 1.0)
    assert t.tam_levels == ([0, 1] if dataset == "pascal_context" else [0, 1, 2])
    # and the model-level reference options come with the registered model
    built = model_config(cfg.model.name, {"semseg": 2}, img_size=cfg.data.size, **cfg.model_overrides())
    assert built.pos_embed_resize == "bilinear" and built.num_heads == 6
    if built.is_moe:
        assert (built.balance_loss, built.init, built.task_embed) == ("reference", "reference", "model")
        assert (built.num_experts, built.top_k, built.expert_hidden, built.renormalize) == (16, 4, 384, False)


def test_task_conditioned_config_uses_the_task_conditioned_router():
    cfg = load_config(CONFIGS / "pascal_context" / "m3vit_small_task_conditioned.yaml")
    built = model_config(cfg.model.name, {"semseg": 21}, img_size=cfg.data.size, **cfg.model_overrides())
    assert built.router == "task_conditioned" and built.is_moe
    assert (built.task_embed, built.task_embed_dim) == ("model", 64)
    # the official task-conditioned config switches every TAM level off; the rest of the recipe as above
    t = cfg.train
    assert not t.cross_task_head
    assert (t.weight_decay_exclude, t.lr_update, cfg.data.scale_rotate) == ("none", "epoch", "reference")


def test_synthetic_configs_keep_their_own_recipe():
    """The demo configs set none of the recipe-level reference options: their defaults apply."""
    for name in ("m3vit_tiny", "mvit_tiny"):
        cfg = load_config(CONFIGS / "synthetic" / f"{name}.yaml")
        raw = yaml.safe_load((CONFIGS / "synthetic" / f"{name}.yaml").read_text())
        assert not {"lr_update", "weight_decay_exclude", "cross_task_head"} & set(raw["train"])
        assert (cfg.train.lr_update, cfg.train.weight_decay_exclude, cfg.train.cross_task_head) == (
            "step", "norms_biases_embeddings", False)


def test_synthetic_pair_matches_in_everything_but_the_mlp():
    moe, dense = (load_config(CONFIGS / "synthetic" / f"{n}.yaml") for n in ("m3vit_tiny", "mvit_tiny"))
    assert moe.to_dict()["data"] == dense.to_dict()["data"]
    assert moe.to_dict()["train"] == dense.to_dict()["train"]
    a, b = (model_config(c.model.name, {"semseg": 8}, img_size=c.data.size, **c.model_overrides())
            for c in (moe, dense))
    assert (a.embed_dim, a.depth, a.num_heads, a.head_channels) == (b.embed_dim, b.depth, b.num_heads, b.head_channels)
    assert a.is_moe and not b.is_moe
    # same active MLP compute per token: top_k experts of width expert_hidden vs one MLP of width mlp_hidden
    assert a.top_k * a.expert_hidden == b.mlp_hidden


def test_synthetic_study_configs_differ_only_in_the_router():
    """The synthetic demo/study configs share data, train and eval sections; the M³ViT variants differ
    only in the router, and the scenes put people near the camera (parts learnable at 128x128)."""
    names = ["m3vit_tiny", "m3vit_tiny_task_conditioned", "m3vit_tiny_shared", "mvit_tiny"]
    cfgs = {n: load_config(CONFIGS / "synthetic" / f"{n}.yaml") for n in names}
    for section in ("data", "train", "eval"):
        assert len({yaml.safe_dump(c.to_dict()[section]) for c in cfgs.values()}) == 1, section
    assert cfgs["m3vit_tiny"].data.people == "close"
    routers = {n: model_config(c.model.name, {"semseg": 8}, img_size=c.data.size, **c.model_overrides()).router
               for n, c in cfgs.items() if n != "mvit_tiny"}
    assert routers == {"m3vit_tiny": "multi_gate", "m3vit_tiny_task_conditioned": "task_conditioned",
                       "m3vit_tiny_shared": "shared"}
    base = cfgs["m3vit_tiny"].to_dict()["model"]
    for name in ("m3vit_tiny_task_conditioned", "m3vit_tiny_shared"):
        other = dict(cfgs[name].to_dict()["model"])
        assert {k: v for k, v in other.items() if k != "router"} == {k: v for k, v in base.items() if k != "router"}


def test_people_applies_to_the_synthetic_data_only():
    assert load_config(None, SMALL).data.people is None  # null: the dataset's default ("sparse")
    with pytest.raises(ConfigError, match=r"data.people: is .close. \(the config sets it\), which applies to the "
                                          r"synthetic dataset only: --set data.people=null for nyud"):
        load_config(None, {**SMALL, "data.name": "nyud", "data.root": "/x", "data.people": "close"})


def test_defaults_round_trip():
    cfg = RunConfig().validate()
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()
    assert load_config(None).to_dict() == cfg.to_dict()
    assert RunConfig.from_dict(None).to_dict() == cfg.to_dict()


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(1, 10**6),
    lr=st.floats(1e-8, 10, allow_nan=False),
    size=st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda hw: [16 * hw[0], 16 * hw[1]]),
    deterministic=st.booleans(),
    grad_clip=st.one_of(st.none(), st.floats(1e-3, 100)),
    tasks=st.one_of(st.none(), st.lists(st.sampled_from(["semseg", "depth", "normals", "edge"]), min_size=1,
                                        max_size=4, unique=True)),
)
def test_valid_overrides_round_trip(steps, lr, size, deterministic, grad_clip, tasks):
    overrides = {"model.name": "m3vit_micro", "train.steps": steps, "train.lr": lr, "data.size": size,
                 "train.deterministic": deterministic, "train.grad_clip": grad_clip, "data.tasks": tasks}
    cfg = load_config(None, overrides)
    assert (cfg.train.steps, cfg.train.lr, list(cfg.data.size)) == (steps, lr, size)
    assert (cfg.train.deterministic, cfg.train.grad_clip, cfg.data.tasks) == (deterministic, grad_clip, tasks)
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # the same overrides as --set strings give the same config
    strings = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
               for k, v in overrides.items()]
    assert load_config(None, strings).to_dict() == cfg.to_dict()


def test_parse_overrides_reads_yaml_values():
    parsed = parse_overrides(["data.size=[64,64]", "data.root=null", "train.grad_clip=0.5", "train.lr=2.0e-3",
                              "train.deterministic=false", "train.steps=12", "data.val_split=val",
                              "train.loss_weights={semseg: 1, depth: 2.5}", "data.train_split=a=b"])
    assert parsed == {"data.size": [64, 64], "data.root": None, "train.grad_clip": 0.5, "train.lr": 0.002,
                      "train.deterministic": False, "train.steps": 12, "data.val_split": "val",
                      "train.loss_weights": {"semseg": 1, "depth": 2.5}, "data.train_split": "a=b"}
    cfg = load_config(None, ["data.size=[64,64]", "train.steps=null", "train.epochs=3", "train.progress=false"])
    assert cfg.data.size == (64, 64) and cfg.train.steps is None and cfg.train.epochs == 3
    assert cfg.train.progress is False
    assert load_config(None, ["data.size=48"]).data.size == (48, 48)


@pytest.mark.parametrize("item, fragment", [
    ("nonsense", "--set expects section.key=value"),
    ("=3", "--set expects section.key=value"),
    ("data.size=[64,", "--set data.size: cannot parse value"),
])
def test_malformed_set_items(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        parse_overrides([item])


@pytest.mark.parametrize("overrides, key", [
    ({"bogus.x": 1}, "bogus"),
    ({"train": 3}, "--set train"),
    ({"train.bogus": 1}, "train.bogus"),
    ({"data.bogus": 1}, "data.bogus"),
    ({"eval.bogus": 1}, "eval.bogus"),
    ({"model.bogus": 1}, "model.bogus"),
    ({"model.tasks": {"semseg": 3}}, "model.tasks"),
    ({"model.img_size": [32, 32]}, "model.img_size"),
])
def test_unknown_section_or_key_names_it(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(key) and ("unknown" in message or "keys are section.key" in message)
    assert "\n" not in message


def test_model_keys_from_the_data_section_say_so():
    with pytest.raises(ConfigError, match=r"model.tasks: unknown key \(set by the data section\)"):
        load_config(None, {"model.tasks": ["semseg"]})


def test_unknown_top_level_section_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: m3vit_micro}\noptim: {lr: 1}\n")
    with pytest.raises(ConfigError, match="optim: unknown section; allowed sections: model, data, train, eval"):
        load_config(path)


BAD_VALUES = [
    # (dotted key, value, fragment of the message) -- one per kind of check
    ("train.steps", "ten", "must be an integer"),
    ("train.steps", 0, "must be >= 1"),
    ("train.batch_size", True, "must be an integer"),
    ("train.batch_size", 2.5, "must be an integer"),
    ("train.lr", 0, "must be > 0"),
    ("train.lr", "fast", "must be a number"),
    ("train.momentum", 1.5, "must be <= 1.0"),
    ("train.weight_decay", -1e-4, "must be >= 0"),
    ("train.optimizer", "adam", "not allowed; choose one of ['sgd', 'adamw']"),
    ("train.schedule", "step", "choose one of"),
    ("train.amp", "fp8", "choose one of"),
    ("train.device", "tpu", "choose one of"),
    ("train.deterministic", "maybe", "must be true or false"),
    ("train.betas", [0.9], "must be [beta1, beta2]"),
    ("train.betas", [0.9, 2.0], "must be <= 1.0"),
    ("train.grad_clip", 0, "must be > 0"),
    ("train.loss_weights", [1, 2], "must map task -> weight"),
    ("train.loss_weights", {"bogus": 1.0}, "'bogus' is not allowed"),
    ("train.loss_weights.semseg", {"semseg": -1.0}, "must be >= 0"),
    ("train.checkpoint_every", -1, "must be >= 0"),
    ("train.keep_checkpoints", 0, "must be >= 1"),
    ("data.name", "imagenet", "choose one of"),
    ("data.size", [64], "must be [H, W]"),
    ("data.size", [64, 0], "must be >= 1"),
    ("data.size", "big", "must be [H, W]"),
    ("data.seed", -1, "must be >= 0"),
    ("data.root", 5, "must be a path string or null"),
    ("data.root", "/data/scenes", "the synthetic dataset is rendered"),
    ("data.tasks", ["semseg", "bogus"], "'bogus' is not allowed"),
    ("data.tasks", [], "must be a non-empty list"),
    ("data.augment", "mixup", "choose one of"),
    ("data.people", "crowd", "choose one of"),
    ("data.val_length", 0, "must be >= 1"),
    ("data.val_split", 3, "must be a split name"),
    ("eval.batch_size", 0, "must be >= 1"),
    ("eval.edge_thresholds", 0, "must be >= 1"),
    ("eval.edge_max_dist", 0.0, "must be > 0"),
    ("eval.baselines", 3, "must be a path string or null"),
    ("model.name", "resnet50", "choose one of"),
    ("model.pretrained", 7, "must be a path string or null"),
    ("train.lr_update", "batch", "'batch' is not allowed; choose one of ['step', 'epoch']"),
    ("train.weight_decay_exclude", "norms", "choose one of ['norms_biases_embeddings', 'none']"),
    ("train.cross_task_module", "pad", "choose one of ['predictions', 'tam']"),
    ("train.tam_levels", [], "must be a non-empty list"),
    ("train.tam_levels", [0, -1], "must be >= 0"),
    ("train.tam_levels", [1, 1], "levels must be distinct"),
    ("train.tam_levels", 2, "must be a non-empty list"),
    ("data.scale_rotate", "nyud", "choose one of ['reference', 'pascal']"),
]


@pytest.mark.parametrize("key, value, fragment", BAD_VALUES, ids=lambda v: str(v)[:30])
def test_bad_value_names_the_dotted_key(key, value, fragment):
    set_key = key if not key.startswith("train.loss_weights.") else "train.loss_weights"
    with pytest.raises(ConfigError) as err:
        load_config(None, {**SMALL, set_key: value})
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert fragment in message
    assert "\n" not in message


def test_loss_weights_must_cover_only_configured_tasks():
    with pytest.raises(ConfigError, match=r"train.loss_weights: weights for task\(s\) \['depth'\] not in data.tasks"):
        load_config(None, {**SMALL, "data.tasks": ["semseg"], "train.loss_weights": {"semseg": 1, "depth": 1}})
    cfg = load_config(None, {**SMALL, "data.tasks": ["semseg", "depth"],
                             "train.loss_weights": {"semseg": 1, "depth": 2}})
    assert cfg.train.loss_weights == {"semseg": 1.0, "depth": 2.0}


@pytest.mark.parametrize("steps, epochs, ok", [(10, None, True), (None, 2, True), (10, 2, False), (None, None, False)])
def test_steps_and_epochs_are_exclusive(steps, epochs, ok):
    overrides = {**SMALL, "train.steps": steps, "train.epochs": epochs}
    if ok:
        cfg = load_config(None, overrides)
        assert (cfg.train.steps, cfg.train.epochs) == (steps, epochs)
    else:
        with pytest.raises(ConfigError, match=r"^train.steps: set exactly one of train.steps and train.epochs"):
            load_config(None, overrides)


@settings(max_examples=40, deadline=None)
@given(num_experts=st.integers(1, 8), top_k=st.integers(1, 10))
def test_top_k_must_not_exceed_num_experts(num_experts, top_k):
    overrides = {**SMALL, "model.num_experts": num_experts, "model.top_k": top_k}
    if top_k <= num_experts:
        assert load_config(None, overrides).model.options["top_k"] == top_k
    else:
        with pytest.raises(ConfigError, match=f"top_k={top_k} must be <= num_experts={num_experts}"):
            load_config(None, overrides)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(16, 96), w=st.integers(16, 96), patch=st.sampled_from([8, 16]))
def test_size_must_be_divisible_by_the_patch(h, w, patch):
    overrides = {**SMALL, "model.patch_size": patch, "data.size": [h, w]}
    if h % patch == 0 and w % patch == 0:
        assert load_config(None, overrides).data.size == (h, w)
    else:
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert str(err.value).startswith(f"model (at data.size=[{h}, {w}])") and "not divisible" in str(err.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("model.embed_dim", 32, "divisible by num_heads"),  # m3vit_micro has 3 heads
    ("model.router", "random", "router='random' is not allowed"),
    ("model.moe_blocks", [0, 9], "moe_blocks=[0, 9] must be distinct block indices"),
    ("model.noise_std", -1.0, "noise_std must be >= 0"),
    ("model.balance_loss", "switch", "balance_loss='switch' is not allowed; choose one of ['reference', 'vmoe']"),
    ("model.init", "xavier", "init='xavier' is not allowed; choose one of ['reference', 'trunc_normal']"),
    ("model.task_embed", "block", "task_embed='block' is not allowed; choose one of ['model', 'layer']"),
    ("model.pos_embed_resize", "nearest", "choose one of ['bilinear', 'bicubic']"),
    ("model.pretrained_experts", "copy", "choose one of ['upcycle', 'init']"),
])
def test_model_options_are_validated(key, value, fragment):
    with pytest.raises(ConfigError, match=r"^model \(at data.size") as err:
        load_config(None, {**SMALL, key: value})
    assert fragment in str(err.value)


def test_replace_returns_a_validated_copy():
    cfg = load_config(None, SMALL)
    changed = cfg.replace({"train.steps": 7, "data.seed": 3})
    assert (changed.train.steps, changed.data.seed) == (7, 3)
    assert (cfg.train.steps, cfg.data.seed) == (300, 0)
    with pytest.raises(ConfigError, match="^train.steps"):
        cfg.replace({"train.steps": -1})


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"steps": 3}}
    out = apply_overrides(data, {"train.steps": 5, "data.seed": 1})
    assert data == {"train": {"steps": 3}} and out == {"train": {"steps": 5}, "data": {"seed": 1}}


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml' does not exist"):  # nor is it a shipped config name
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(listing)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="^train: must be a mapping of keys"):
        load_config(section)


def test_shipped_configs_are_addressable_by_name_from_any_directory(tmp_path, monkeypatch):
    from m3vit.engine.config import resolve_config_path, shipped_configs

    monkeypatch.chdir(tmp_path)  # far from the repository
    assert "synthetic/m3vit_tiny" in shipped_configs() and "pascal_context/m3vit_small" in shipped_configs()
    for name in ("synthetic/m3vit_tiny", "synthetic/m3vit_tiny.yaml", "configs/synthetic/m3vit_tiny.yaml"):
        assert load_config(name).model.name == "m3vit_micro"
    own = tmp_path / "synthetic" / "m3vit_tiny.yaml"  # a file of the user's wins over a shipped name
    own.parent.mkdir()
    own.write_text("model: {name: mvit_micro}\n")
    assert resolve_config_path("synthetic/m3vit_tiny.yaml") == Path("synthetic/m3vit_tiny.yaml")
    with pytest.raises(ConfigError, match=r"'nope/x' does not exist, and it is not the name of a shipped config "
                                          r"\(.*synthetic/m3vit_tiny"):
        load_config("nope/x")


def test_a_plain_install_ships_the_configs(tmp_path):
    """`pip install .` (not editable) puts the configs into the package: `m3vit train --config NAME` works."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "m3vit" / "configs" / "synthetic" / "m3vit_tiny.yaml").is_file()
    probe = ("from m3vit.engine.config import load_config, resolve_config_path; "
             "print(resolve_config_path('synthetic/m3vit_tiny')); print(load_config('pascal_context/m3vit_small').model.name)")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split()
    assert first.startswith(str(target)) and second == "m3vit_small"


# ----------------------------------------------------------------------------------------------
# Non-finite numbers, seeds, sizes and unreadable files
# ----------------------------------------------------------------------------------------------
FLOAT_KEYS = ["train.lr", "train.momentum", "train.weight_decay", "train.poly_power", "train.min_lr",
              "train.grad_clip", "train.aux_weight", "train.cross_task_weight", "eval.edge_max_dist"]
MODEL_FLOAT_KEYS = ["model.mlp_ratio", "model.expert_ratio", "model.drop_path_rate", "model.noise_std",
                    "model.capacity_factor"]


@pytest.mark.parametrize("key", FLOAT_KEYS + MODEL_FLOAT_KEYS + ["train.betas", "train.loss_weights.semseg"])
@pytest.mark.parametrize("value, text", [(float("nan"), ".nan"), (float("inf"), ".inf"), (float("-inf"), "-.inf")])
def test_every_float_rejects_nan_and_inf(key, value, text):
    """As a Python value and as YAML text in --set (the issue: NaN was accepted for train.momentum)."""
    if key == "train.betas":
        cases = [{key: [0.9, value]}, [f"{key}=[0.9, {text}]"]]
    elif key == "train.loss_weights.semseg":
        cases = [{"train.loss_weights": {"semseg": value}}, [f"train.loss_weights={{semseg: {text}}}"]]
    else:
        cases = [{key: value}, [f"{key}={text}"]]
    for overrides in cases:
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        message = str(err.value)
        assert key.split(".")[-1 if key.startswith("model") else 1] in message, message
        assert "finite number" in message and "\n" not in message, message


@pytest.mark.parametrize("key", ["train.seed", "data.seed"])
def test_seeds_are_bounded_to_what_every_generator_accepts(key, tmp_path):
    from m3vit.engine.config import MAX_SEED

    assert MAX_SEED == 2**32 - 1
    for bad in (2**70, 2**32, -1):
        with pytest.raises(ConfigError, match=f"^{key}: must be "):
            load_config(None, {key: bad})
    cfg = load_config(None, {key: MAX_SEED})
    assert (cfg.train.seed if key == "train.seed" else cfg.data.seed) == MAX_SEED
    # the largest seed works where seeds go: torch (plus the trainer's rank/step offsets), numpy, the data RNG
    torch.manual_seed(MAX_SEED + 7919 * 7 + 10**6)
    np.random.seed(MAX_SEED % 2**32)
    np.random.default_rng(np.random.SeedSequence([MAX_SEED, 1, 2, 3, 1]))


def test_data_size_is_bounded():
    with pytest.raises(ConfigError, match=r"^data.size: must be <= 4096, got 16000"):
        load_config(None, {"data.size": [16000, 16000]})
    with pytest.raises(ConfigError, match=r"^model \(at data.size=\[4096, 4096\]\).*65536 patch tokens"):
        load_config(None, {"data.size": [4096, 4096]})


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"config {str(tmp_path)!r} is a directory, not a YAML file"


def test_a_binary_config_file_names_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: not a YAML text file") and "\n" not in str(err.value)


def test_yaml_11_number_strings_are_numbers():
    cfg = load_config(None, {"train.lr": "1e-3", "model.noise_std": "1e-2"})
    assert cfg.train.lr == 1e-3
