"""Device rules: the device names a config or command accepts (``DEVICES``) and what each resolves to."""

from __future__ import annotations

import torch

from ..utils.errors import ConfigError

__all__ = ["DEVICES", "resolve_device"]

#: Accepted device names (``train.device``, ``--device``).
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto``/``cpu``/``cuda`` -> a device: ``auto`` picks CUDA when available (this process's local
    rank). Errors name the setting ``key`` it came from."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"{key}: {name!r} is not allowed; choose one of {list(DEVICES)}")
    return torch.device("cpu")
