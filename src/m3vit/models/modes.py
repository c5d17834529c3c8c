"""Run a model in eval mode for a while and give it back as it was (train or eval)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model): ...`` runs the block with ``model.eval()`` and restores ``model.training``
    afterwards, also when the block raises (the caller's train/eval choice is never changed behind its back)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
