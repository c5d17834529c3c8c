"""Run configuration: YAML files -> typed, validated dataclasses, with ``--set a.b=value`` overrides.

A run config has four sections. ``model`` names a registered model and overrides any
``ModelConfig`` field (``--set model.num_experts=32``); the tasks and their output channels come from
the dataset, ``img_size`` from ``data.size``. ``data`` says what to train and evaluate on, ``train``
how to optimise, ``eval`` how to score. Every unknown key and bad value raises ``ConfigError`` naming
the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import math
import os
from importlib import resources
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS, SCALE_ROTATE_RECIPES, datasets_with_people
from ..models.config import MAX_INPUT_SIDE, ConfigError, ModelConfig, parse_number
from ..models.factory import model_config
from ..models.registry import list_models
from ..tasks import list_tasks
from .cross_task import CROSS_TASK_MODULES
from .device import DEVICES
from .schedules import LR_UPDATES, WEIGHT_DECAY_EXCLUDES

__all__ = [
    "RunConfig", "ModelSection", "DataSection", "TrainSection", "EvalSection", "ConfigError",
    "load_config", "parse_overrides", "apply_overrides", "resolve_config_path", "shipped_configs", "MAX_SEED",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
AUGMENTATIONS = ("crop", "resize", "none")

#: Seeds (``train.seed``, ``data.seed``) lie in [0, MAX_SEED]: what every generator they feed accepts
#: (``numpy.random.seed`` takes 32 bits; ``torch.manual_seed`` 64, and the trainer adds rank and step).
MAX_SEED = 2**32 - 1

# ModelConfig fields a config may not set under ``model``: they come from the data section.
_MODEL_FROM_DATA = ("tasks", "img_size", "name")


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def _check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(key, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _fail(key, f"must be <= {maximum}, got {value}")
    return value


def _check_seed(key: str, value: Any) -> int:
    return _check_int(key, value, 0, MAX_SEED)


def _check_float(key: str, value: Any, minimum: float | None = None, strict: bool = False,
                 maximum: float | None = None) -> float:
    number = parse_number(value)  # YAML 1.1 reads 1e-3 (no dot) as a string: accepted
    if number is None:
        raise _fail(key, f"must be a number, got {value!r}")
    if not math.isfinite(number):
        raise _fail(key, f"must be a finite number, got {value!r}")
    value = number
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise _fail(key, f"must be {'>' if strict else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _fail(key, f"must be <= {maximum}, got {value}")
    return value


def _check_choice(key: str, value: Any, allowed) -> str:
    if value not in allowed:
        raise _fail(key, f"{value!r} is not allowed; choose one of {list(allowed)}")
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"must be true or false, got {value!r}")
    return value


def _check_opt_str(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise _fail(key, f"must be a path string or null, got {value!r}")
    return None if value is None else str(value)


def _check_size(key: str, value: Any) -> tuple[int, int]:
    """[H, W] with each side in 1..MAX_INPUT_SIDE; ``RunConfig.validate`` checks the rest of the input-size
    rule (multiples of the model's patch size, bounded tokens) once the model is known."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(key, f"must be [H, W] (two positive integers), got {value!r}")
    return tuple(_check_int(key, v, 1, MAX_INPUT_SIDE) for v in value)


@dataclass
class ModelSection:
    """``name``: a registered model (``m3vit models``); ``pretrained``: a local ViT checkpoint to
    initialise the backbone from; ``options``: ``ModelConfig`` overrides, written flat in YAML
    (``model: {name: m3vit_small, num_experts: 32}``)."""

    name: str = "m3vit_micro"
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str = "model") -> None:
        _check_choice(f"{prefix}.name", self.name, list_models())
        self.pretrained = _check_opt_str(f"{prefix}.pretrained", self.pretrained)
        allowed = [k for k in ModelConfig.keys() if k not in _MODEL_FROM_DATA]
        for key in self.options:
            if key not in allowed:
                hint = " (set by the data section)" if key in _MODEL_FROM_DATA else ""
                raise _fail(f"{prefix}.{key}", f"unknown key{hint}; allowed: name, pretrained, {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained, **copy.deepcopy(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSection":
        data = dict(data)
        return cls(name=data.pop("name", cls.name), pretrained=data.pop("pretrained", None), options=data)


@dataclass
class DataSection:
    """What to train and evaluate on. ``size`` is the training crop / synthetic render size and the
    model's ``img_size``; ``train_length``/``val_length`` and ``people`` (``sparse``, the default when
    null, or ``close``: see ``m3vit.data.synthetic.PEOPLE_MODES``) apply to the synthetic dataset only.
    ``scale_rotate`` picks the scale-and-rotate augmentation: ``reference`` is the official recipe of
    the dataset (NYUD: a scale from {1, 1.2, 1.5}, no rotation; the others: scale U(0.75, 1.25),
    rotation U(±20°)), ``pascal`` the latter for every dataset (docs/reference.md)."""

    name: str = "synthetic"
    root: str | None = None
    size: tuple[int, int] = (128, 128)
    seed: int = 0
    tasks: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_length: int = 2000
    val_length: int = 64
    augment: str = "crop"
    scale_rotate: str = "pascal"
    num_workers: int = 0
    people: str | None = None

    def validate(self, prefix: str = "data") -> None:
        _check_choice(f"{prefix}.name", self.name, sorted(DATASETS))
        self.root = _check_opt_str(f"{prefix}.root", self.root)
        dataset = DATASETS[self.name]
        if not dataset.reads_files and self.root is not None:
            raise _fail(f"{prefix}.root", f"the {self.name} dataset is rendered, not read: set it to null")
        self.size = _check_size(f"{prefix}.size", self.size)
        _check_seed(f"{prefix}.seed", self.seed)
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                self.tasks = [self.tasks]
            if not isinstance(self.tasks, list) or not self.tasks:
                raise _fail(f"{prefix}.tasks", f"must be a non-empty list of task names or null, got {self.tasks!r}")
            for task in self.tasks:
                _check_choice(f"{prefix}.tasks", task, list_tasks())
        for key in ("train_split", "val_split"):
            if not isinstance(getattr(self, key), str):
                raise _fail(f"{prefix}.{key}", f"must be a split name, got {getattr(self, key)!r}")
        _check_int(f"{prefix}.train_length", self.train_length, 1)
        _check_int(f"{prefix}.val_length", self.val_length, 1)
        _check_choice(f"{prefix}.augment", self.augment, AUGMENTATIONS)
        _check_choice(f"{prefix}.scale_rotate", self.scale_rotate, SCALE_ROTATE_RECIPES)
        _check_int(f"{prefix}.num_workers", self.num_workers, 0)
        if self.people is not None:
            with_people = datasets_with_people()
            _check_choice(f"{prefix}.people", self.people, sorted({m for n in with_people for m in DATASETS[n].people_modes}))
            if not dataset.people_modes:
                raise _fail(f"{prefix}.people", f"is {self.people!r} (the config sets it), which applies to the "
                                                f"{' or '.join(with_people)} dataset only: --set {prefix}.people=null "
                                                f"for {self.name}")


@dataclass
class TrainSection:
    """How to optimise. Exactly one of ``steps`` and ``epochs`` sets the run length; ``batch_size`` is
    per process. ``loss_weights`` default to the dataset's reference weights (``null``);
    ``aux_weight`` is the MoE balance-loss weight λ.

    ``lr_update``: the lr changes every ``step`` or once per ``epoch`` (official). ``weight_decay_exclude``:
    ``norms_biases_embeddings`` (no decay on 1-d parameters, positional embedding, cls token, expert
    biases) or ``none`` (every parameter decays, official). ``cross_task_head`` switches a training-only
    cross-task module on: ``cross_task_module: predictions`` (``CrossTaskHead`` on the final
    predictions) or ``tam`` (the official task-attention module on the heads' stage outputs at
    ``tam_levels``: level ℓ reads head stage ℓ + 1), its losses weighted by ``cross_task_weight``."""

    steps: int | None = 300
    epochs: int | None = None
    batch_size: int = 8
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    amp: str = "none"
    device: str = "auto"
    deterministic: bool = True
    loss_weights: dict[str, float] | None = None
    aux_weight: float = 0.01
    cross_task_head: bool = False
    cross_task_weight: float = 1.0
    cross_task_module: str = "predictions"
    tam_levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr_update: str = "step"
    weight_decay_exclude: str = "norms_biases_embeddings"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    progress: bool = True

    def validate(self, prefix: str = "train") -> None:
        if (self.steps is None) == (self.epochs is None):
            raise _fail(f"{prefix}.steps", f"set exactly one of {prefix}.steps and {prefix}.epochs "
                        f"(got steps={self.steps!r}, epochs={self.epochs!r}); set the other to null")
        if self.steps is not None:
            _check_int(f"{prefix}.steps", self.steps, 1)
        if self.epochs is not None:
            _check_int(f"{prefix}.epochs", self.epochs, 1)
        _check_int(f"{prefix}.batch_size", self.batch_size, 1)
        _check_seed(f"{prefix}.seed", self.seed)
        _check_choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        self.lr = _check_float(f"{prefix}.lr", self.lr, 0.0, strict=True)
        self.momentum = _check_float(f"{prefix}.momentum", self.momentum, 0.0, maximum=1.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise _fail(f"{prefix}.betas", f"must be [beta1, beta2], got {self.betas!r}")
        self.betas = tuple(_check_float(f"{prefix}.betas", b, 0.0, maximum=1.0) for b in self.betas)
        self.weight_decay = _check_float(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        self.poly_power = _check_float(f"{prefix}.poly_power", self.poly_power, 0.0, strict=True)
        _check_int(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        self.min_lr = _check_float(f"{prefix}.min_lr", self.min_lr, 0.0)
        if self.grad_clip is not None:
            self.grad_clip = _check_float(f"{prefix}.grad_clip", self.grad_clip, 0.0, strict=True)
        _check_choice(f"{prefix}.amp", self.amp, AMP_MODES)
        _check_choice(f"{prefix}.device", self.device, DEVICES)
        _check_bool(f"{prefix}.deterministic", self.deterministic)
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, dict):
                raise _fail(f"{prefix}.loss_weights", f"must map task -> weight, got {self.loss_weights!r}")
            for task, weight in self.loss_weights.items():
                _check_choice(f"{prefix}.loss_weights", task, list_tasks())
                self.loss_weights[task] = _check_float(f"{prefix}.loss_weights.{task}", weight, 0.0)
        self.aux_weight = _check_float(f"{prefix}.aux_weight", self.aux_weight, 0.0)
        _check_bool(f"{prefix}.cross_task_head", self.cross_task_head)
        self.cross_task_weight = _check_float(f"{prefix}.cross_task_weight", self.cross_task_weight, 0.0)
        _check_choice(f"{prefix}.cross_task_module", self.cross_task_module, CROSS_TASK_MODULES)
        if isinstance(self.tam_levels, tuple):
            self.tam_levels = list(self.tam_levels)
        if not isinstance(self.tam_levels, list) or not self.tam_levels:
            raise _fail(f"{prefix}.tam_levels",
                        f"must be a non-empty list of head levels (0, 1, ...), got {self.tam_levels!r}")
        for level in self.tam_levels:
            _check_int(f"{prefix}.tam_levels", level, 0)
        if len(set(self.tam_levels)) != len(self.tam_levels):
            raise _fail(f"{prefix}.tam_levels", f"levels must be distinct, got {self.tam_levels}")
        _check_choice(f"{prefix}.lr_update", self.lr_update, LR_UPDATES)
        _check_choice(f"{prefix}.weight_decay_exclude", self.weight_decay_exclude, WEIGHT_DECAY_EXCLUDES)
        _check_int(f"{prefix}.checkpoint_every", self.checkpoint_every, 0)
        _check_int(f"{prefix}.keep_checkpoints", self.keep_checkpoints, 1)
        _check_int(f"{prefix}.log_every", self.log_every, 1)
        _check_int(f"{prefix}.eval_every", self.eval_every, 0)
        _check_bool(f"{prefix}.progress", self.progress)


@dataclass
class EvalSection:
    """How to score: on ``data.val_split``, predictions upsampled to the label resolution.
    ``edge_thresholds``/``edge_max_dist`` configure the edge metric (99 / 0.0075 is the BSDS
    protocol; fewer thresholds are much faster); ``baselines`` is a metrics file for Δm."""

    batch_size: int = 8
    edge_thresholds: int = 99
    edge_max_dist: float = 0.0075
    edge_workers: int = 0
    baselines: str | None = None

    def validate(self, prefix: str = "eval") -> None:
        _check_int(f"{prefix}.batch_size", self.batch_size, 1)
        _check_int(f"{prefix}.edge_thresholds", self.edge_thresholds, 1)
        self.edge_max_dist = _check_float(f"{prefix}.edge_max_dist", self.edge_max_dist, 0.0, strict=True)
        _check_int(f"{prefix}.edge_workers", self.edge_workers, 0)
        self.baselines = _check_opt_str(f"{prefix}.baselines", self.baselines)


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection}


@dataclass
class RunConfig:
    """A whole run: ``model``, ``data``, ``train`` and ``eval`` sections (see each class)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> "RunConfig":
        for name in _SECTIONS:
            getattr(self, name).validate(name)
        try:  # the model options, checked against the architecture (tasks come from the data later)
            model_config(self.model.name, {"_": 1}, img_size=self.data.size, **self.model.options)
        except ConfigError as exc:
            raise ConfigError(f"model (at data.size={list(self.data.size)}): {exc}") from None
        if self.train.loss_weights is not None and self.data.tasks is not None:
            extra = sorted(set(self.train.loss_weights) - set(self.data.tasks))
            if extra:
                raise _fail("train.loss_weights", f"weights for task(s) {extra} not in data.tasks {self.data.tasks}")
        return self

    def to_dict(self) -> dict:
        out = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            if isinstance(section, ModelSection):
                out[name] = section.to_dict()
            else:
                out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_overrides(self) -> dict[str, Any]:
        """``ModelConfig`` overrides for ``create_model`` (everything but the name and the tasks)."""
        return copy.deepcopy(self.model.options)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "RunConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config must be a mapping of sections {list(_SECTIONS)}")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section; allowed sections: {', '.join(_SECTIONS)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: must be a mapping of keys, got {values!r}")
            if section_cls is ModelSection:
                sections[name] = ModelSection.from_dict(values)
                continue
            allowed = [f.name for f in fields(section_cls)]
            for key in values:
                if key not in allowed:
                    raise ConfigError(f"{name}.{key}: unknown key; allowed: {', '.join(allowed)}")
            sections[name] = section_cls(**copy.deepcopy(values))
        return cls(**sections).validate()

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A validated copy with dotted overrides applied (``{"train.steps": 10}``)."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def parse_overrides(items: list[str] | None, key_form: str = "section.key") -> dict[str, Any]:
    """``["train.steps=10", "data.size=[64,64]"]`` -> ``{"train.steps": 10, "data.size": [64, 64]}``
    (values parsed as YAML); ``key_form`` names the expected key in the error for a malformed item."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects {key_form}=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {value!r} as YAML") from None
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the nested mapping ``data`` with each dotted key set (``a.b.c=v`` sets data[a][b][c])."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {dotted}: keys are section.key (sections: {', '.join(_SECTIONS)}), "
                              f"e.g. train.steps=100")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"{parts[0]}: unknown section; allowed sections: {', '.join(_SECTIONS)}")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def shipped_configs() -> list[str]:
    """Names of the run configs shipped inside the package (``synthetic/m3vit_tiny``, ...)."""
    root = resources.files("m3vit.configs")
    return sorted(f"{group.name}/{item.name.removesuffix('.yaml')}" for group in root.iterdir() if group.is_dir()
                  for item in group.iterdir() if item.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A run config file: ``name_or_path`` itself when it exists, else the shipped config of that name
    (``synthetic/m3vit_tiny``, with or without ``.yaml`` and a leading ``configs/``), from any directory.
    Neither: a ``ConfigError`` listing the shipped names."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path).removeprefix("configs/").removesuffix(".yaml")
    shipped = resources.files("m3vit.configs") / f"{name}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"config file {str(name_or_path)!r} does not exist, and it is not the name of a shipped config "
                      f"({', '.join(shipped_configs())})")


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read a YAML run config (a file, or a shipped config by name; the defaults when ``path`` is None)
    and apply overrides (a dict of dotted keys, or ``--set`` strings)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"config {source!r} is a directory, not a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {source!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not a YAML text file (it is not UTF-8 text)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc.__class__.__name__}: {exc})".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config must be a mapping of sections {list(_SECTIONS)}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
    return RunConfig.from_dict(data, source)
