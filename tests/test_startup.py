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


def test_help_does_not_import_torch():
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["infer", "--help"]):
        code = ("import contextlib, io\nfrom m3vit.cli import main\n"
                f"with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main({argv!r})\n"
                "    except SystemExit:\n        pass")
        assert _loaded_after(code) == [], argv


def test_import_m3vit_is_light_and_a_model_needs_only_torch():
    assert _loaded_after("import m3vit") == []
    assert _loaded_after("import m3vit\nm3vit.create_model('m3vit_micro', ['semseg'], img_size=(32, 32))") == ["torch"]
