"""Device rules: ``auto`` picks CUDA only when there is one, ``cuda`` without one and unknown names are
config errors naming the setting they came from and the allowed names."""

from __future__ import annotations

import pytest
import torch

from m3vit.engine.config import ConfigError
from m3vit.engine.device import DEVICES, resolve_device


def test_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1) == resolve_device("cuda", 1)
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_bad_devices_are_config_errors_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device: 'cuda' requested but no CUDA device is available"):
        resolve_device("cuda", key="--device")
    with pytest.raises(ConfigError, match=r"train.device: 'tpu' is not allowed; choose one of \['auto', 'cpu', 'cuda'\]"):
        resolve_device("tpu")
    assert DEVICES == ("auto", "cpu", "cuda")
