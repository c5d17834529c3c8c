"""What every benchmark records about its run: the load average, device synchronisation, the machine."""

from __future__ import annotations

import os
import platform
import sys

import torch


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or ``n/a``: check it before timing."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a wall-clock time covers it (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def environment() -> dict:
    """Threads, torch, platform, CPU count and the command line, for a benchmark's JSON."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "command": " ".join([os.path.relpath(sys.executable), *sys.argv])}
