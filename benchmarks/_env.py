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


def machine_info() -> dict:
    """The CPU model, core count, torch build and threads, and the CUDA device when there is one."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def environment() -> dict:
    """Threads, torch, platform, CPU count and the command line, for a benchmark's JSON."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "command": " ".join([os.path.relpath(sys.executable), *sys.argv])}
