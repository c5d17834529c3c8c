"""The command line's choice lists, as constants that import nothing heavy, so that building the parser
(``m3vit --help``) loads no PyTorch. Each mirrors the registry or constant that owns it (named beside it);
``tests/test_cli.py`` checks that they agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DATASETS = ("synthetic", "pascal_context", "nyud")  # m3vit.data.DATASETS
PEOPLE_MODES = ("sparse", "close")  # m3vit.data.synthetic.PEOPLE_MODES
DEVICES = ("auto", "cpu", "cuda")  # m3vit.engine.config.DEVICES
EVAL_PATHWAYS = ("single", "all")  # m3vit.engine.inference.PATHWAYS
EVAL_PROTOCOLS = ("default", "reference")  # m3vit.tasks.base.PROTOCOLS
HW_DESIGNS = ("dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip")  # m3vit.hardware.simulator.DESIGNS
ROUNDINGS = ("nearest", "floor")  # m3vit.efficiency.fixed_point.ROUNDINGS
OVERFLOWS = ("saturate", "wrap")  # m3vit.efficiency.fixed_point.OVERFLOWS
GATE_SOFTMAX = ("all", "kept")  # m3vit.models.config.GATE_SOFTMAX
INT8_METHODS = ("static", "dynamic")  # m3vit.efficiency.onnx_export.QUANTIZATION_METHODS


def packaged_platforms() -> list[str]:
    """Names of the packaged accelerator platforms, read from the package's files without importing
    ``m3vit.hardware`` (which loads PyTorch); the same list as ``m3vit.hardware.spec.list_platforms()``."""
    spec = importlib.util.find_spec("m3vit.hardware")  # imports only the (light) parent package
    folders = spec.submodule_search_locations if spec is not None else None
    if not folders:
        return []
    return sorted(p.stem for p in (Path(folders[0]) / "platforms").glob("*.yaml"))
