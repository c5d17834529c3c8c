"""Start-up cost: ``m3vit --help`` does not import PyTorch, and ``import m3vit`` pulls no heavy optional
dependency (SciPy, scikit-image, matplotlib, ONNX) until a feature that needs it is used."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "scipy", "skimage", "matplotlib", "onnx", "onnxruntime", "pyEdgeEval")


def _loaded_after(code: str) -> list[str]:
    probe = f"""
import json, sys
{code}
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_of_every_command_does_not_import_torch():
    """``m3vit --help`` and ``m3vit CMD [SUB] --help`` for every (sub)command the parser has, in one process."""
    code = """
import argparse, contextlib, io
from m3vit.cli import build_parser, main

def commands(parser, path=()):
    yield list(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))

seen = set()
for argv in commands(build_parser()):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*argv, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert out.getvalue().startswith("usage: m3vit"), argv
    seen.add(" ".join(argv))
expected = {"", "models", "flops", "hw simulate", "hw compare", "demo", "study", "train", "eval", "infer",
            "experts", "analyze conflicts", "analyze compare", "export", "data show", "serve"}
assert expected <= seen, sorted(expected - seen)
"""
    assert _loaded_after(code) == []


def test_import_m3vit_is_light_and_a_model_needs_only_torch():
    assert _loaded_after("import m3vit") == []
    assert _loaded_after("import m3vit\nm3vit.create_model('m3vit_micro', ['semseg'], img_size=(32, 32))") == ["torch"]


def test_importing_the_packages_pulls_no_optional_dependency():
    """SciPy, scikit-image (PASCAL labels, edge metrics), matplotlib (figures) and ONNX load when a feature
    that needs them runs, not when a package that holds the feature is imported."""
    code = ("import m3vit.data, m3vit.engine.trainer, m3vit.engine.inference, m3vit.engine.evaluator, "
            "m3vit.analysis, m3vit.efficiency, m3vit.experiments.study, m3vit.serve")
    assert _loaded_after(code) == ["torch"]
