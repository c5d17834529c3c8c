"""``torch.compile`` for models holding MoE layers: ``compile_model(model)``.

The MoE layer compiles without graph breaks, for inference and for training: routing (router, softmax,
top-k, gate noise) is traced and fused, and the data-dependent dispatch runs as the registered op
``m3vit::moe_experts`` (``m3vit.nn.dispatch.moe_experts_op``, with a backward op), whose fake
implementation gives the compiler its output shapes. Task ids given as an ``int`` (one task) or a tensor
are checked on the device without a host sync (a bad id then raises ``RuntimeError`` when the graph
runs), and the per-task balance loss uses masks instead of gathering each task's rows. Compiled outputs
equal eager within float tolerance (fusion changes rounding); eager stays bit-identical to before.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from ..utils.errors import InputError

__all__ = ["compile_model", "default_backend"]

log = logging.getLogger(__name__)


def default_backend(device: str | torch.device = "cpu") -> str:
    """``"inductor"``, or on CPU without a C++ compiler (which inductor needs there) ``"aot_eager"``."""
    if torch.device(device).type != "cpu":
        return "inductor"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return "inductor" if any(c and shutil.which(c) for c in compilers) else "aot_eager"


def compile_model(model: nn.Module, *, backend: str | None = None, mode: str | None = None,
                  fullgraph: bool = False, dynamic: bool | None = None) -> nn.Module:
    """``torch.compile(model)`` with the backend this machine can run (``default_backend`` of the model's
    device unless ``backend`` is given); ``mode``, ``fullgraph`` and ``dynamic`` are ``torch.compile``'s.

    Returns the compiled module: it shares the model's parameters and forwards attribute access
    (``compiled.moe_layers``, ``compiled.aux_loss()``); the first call compiles. A model whose MoE layers
    stream their experts from a file (``m3vit.efficiency.streaming``) runs eagerly only, and an unknown
    ``backend`` is a user's error: ``InputError``.
    """
    if any(not getattr(m, "compilable", True) for m in model.modules()):
        raise InputError("this model streams its experts from the checkpoint file, which runs eagerly only; "
                         "load it resident (without --stream-experts) to compile it")
    if backend is None:
        param = next(model.parameters(), None)
        backend = default_backend(param.device if param is not None else "cpu")
        log.info("compiling %s with torch.compile backend %r", type(model).__name__, backend)
    try:
        return torch.compile(model, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    except torch._dynamo.exc.InvalidBackend:  # the name is looked up at once: a user's typo, not a bug
        raise InputError(f"{backend!r} is not a torch.compile backend: use inductor, aot_eager or eager (all: "
                         f"torch._dynamo.list_backends(exclude_tags=()))") from None
