"""FPGA platforms as data: a validated ``Platform`` loaded from a YAML file (packaged or user-given).

A platform file names the device's datasheet figures (clock, DSP slices, on-chip RAM, DRAM bandwidth,
board power) and the accelerator's datapath parameters. Every parameter, what it means and why it has
its value (the packaged files cite their datasheets in comments):

* ``clock_mhz`` - accelerator clock. ZCU104: 300 MHz (the paper's design).
* ``dsp_slices`` - DSP48E2 slices of the device (datasheet).
* ``bram_mbit``, ``uram_mbit`` - on-chip block RAM and UltraRAM in Mb (datasheet); their sum is the
  capacity the simulator compares each design's on-chip requirement against (``fits_on_chip``).
* ``dram_bandwidth_gbs`` - peak DRAM bandwidth in GB/s (bus width x transfer rate; datasheet).
* ``board_power_w`` - power of the board while the accelerator runs; energy = power x latency.
* ``macs_per_dsp_per_cycle`` - multiply-accumulates one DSP slice completes per cycle: 1 for a
  16-bit weight x activation product (fits the 27x18 multiplier); 2 would mean packing two 8-bit MACs.
* ``pe_utilisation`` - fraction of the DSP peak the MAC array sustains (DSPs not in the array serve
  softmax/GELU/LayerNorm units and address logic; pipeline fill and tile edges cost the rest).
  FITTED: 0.889 reproduces the paper's dense ViT-S latency; it equals a 1536-DSP MAC array at full
  rate (1536 / 1728), leaving 192 DSPs for the non-linear units.
* ``dram_efficiency`` - sustained / peak DRAM bandwidth for the long sequential weight bursts the
  accelerator issues. 0.9, not fitted: DDR4 refresh alone costs ~4.5% (tRFC 350 ns every tREFI 7.8 us
  for 8 Gb parts) and bus turnaround / row switches a few % more.
* ``weight_bits`` - weight word (16-bit fixed point in the public FPGA design).
* ``activation_bits`` - activation word in the on-chip token buffers and at the multiplier input.
* ``token_buffers`` - number of ``N x D`` token buffers kept on chip (2: the residual stream and the
  attention-output / MoE-accumulator buffer; a layer cannot overwrite its own input).

Every number must lie in its range in ``LIMITS`` (far beyond any real board, but finite, so no latency,
traffic or energy can overflow or divide by zero); a value outside, NaN or inf raises ``PlatformError``
naming the file, the key and the range.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from ..models.config import parse_number
from ..utils.errors import ConfigError

__all__ = ["Platform", "PlatformError", "LIMITS", "load_platform", "list_platforms"]

_PACKAGE_DIR = "platforms"


#: Allowed range ``(low, high)`` of every numeric platform key, both ends included.
LIMITS: dict[str, tuple[float, float]] = {
    "clock_mhz": (1.0, 10_000.0),
    "dsp_slices": (1, 1_000_000),
    "bram_mbit": (0.001, 1_000_000.0),
    "uram_mbit": (0.0, 1_000_000.0),
    "dram_bandwidth_gbs": (0.001, 100_000.0),
    "board_power_w": (0.001, 100_000.0),
    "macs_per_dsp_per_cycle": (0.01, 64.0),
    "pe_utilisation": (0.001, 1.0),
    "dram_efficiency": (0.001, 1.0),
    "weight_bits": (1, 64),
    "activation_bits": (1, 64),
    "token_buffers": (1, 64),
}


class PlatformError(ConfigError):
    """A platform file is missing, unreadable or has a bad value; the message names the file and key."""


@dataclass(frozen=True)
class Platform:
    """One FPGA board and the accelerator's datapath on it (see the module docstring for each field)."""

    name: str
    clock_mhz: float
    dsp_slices: int
    bram_mbit: float
    uram_mbit: float
    dram_bandwidth_gbs: float
    board_power_w: float
    macs_per_dsp_per_cycle: float
    pe_utilisation: float
    dram_efficiency: float
    weight_bits: int
    activation_bits: int
    token_buffers: int
    description: str = ""
    device: str = ""

    # -- derived quantities ------------------------------------------------------------------
    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def macs_per_cycle(self) -> float:
        """Sustained MACs per cycle of the MAC array."""
        return self.dsp_slices * self.macs_per_dsp_per_cycle * self.pe_utilisation

    @property
    def dram_bytes_per_cycle(self) -> float:
        """Sustained DRAM bytes per accelerator cycle."""
        return self.dram_bandwidth_gbs * 1e9 * self.dram_efficiency / self.clock_hz

    @property
    def onchip_capacity_bytes(self) -> float:
        """BRAM + URAM in bytes (Xilinx's Mb are 2**20 bits: 312 x 36 Kb = 11.0 Mb)."""
        return (self.bram_mbit + self.uram_mbit) * 2**20 / 8

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def activation_bytes(self) -> float:
        return self.activation_bits / 8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- construction and validation ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data, source: str = "platform") -> "Platform":
        if not isinstance(data, dict):
            raise PlatformError(f"{source}: a platform file must be a YAML mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        optional = {"description", "device"}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PlatformError(f"{source}: unknown key(s) {unknown}; allowed: {names}")
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise PlatformError(f"{source}: missing key(s) {missing}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("name", "description", "device"):
                if not isinstance(value, str) or (f.name == "name" and not value):
                    raise PlatformError(f"{source}: {f.name} must be a non-empty string, got {value!r}")
                values[f.name] = value
                continue
            number = parse_number(value)  # YAML 1.1 reads 1e308 (no dot) as a string: accepted
            if number is None:
                raise PlatformError(f"{source}: {f.name} must be a number, got {value!r}")
            if not math.isfinite(number):
                raise PlatformError(f"{source}: {f.name} must be a finite number, got {value!r}")
            if f.type == "int" and number != int(number):
                raise PlatformError(f"{source}: {f.name} must be a whole number, got {value!r}")
            low, high = LIMITS[f.name]
            if f.name in ("pe_utilisation", "dram_efficiency") and not 0 < number <= 1:
                raise PlatformError(f"{source}: {f.name} is a fraction and must be in (0, 1], got {number:g}")
            if number <= 0 and (low > 0 or number < 0):
                raise PlatformError(f"{source}: {f.name} must be {'> 0' if low > 0 else '>= 0'}, got {number:g}")
            if not low <= number <= high:
                raise PlatformError(f"{source}: {f.name} must be in [{low:g}, {high:g}], got {number:g}")
            values[f.name] = int(number) if f.type == "int" else number
        return cls(**values)


def _packaged(name: str) -> Path | None:
    path = resources.files("m3vit.hardware").joinpath(_PACKAGE_DIR, f"{name}.yaml")
    return Path(str(path)) if path.is_file() else None


def list_platforms() -> list[str]:
    """Names of the packaged platforms (``load_platform`` also accepts a path to a YAML file)."""
    folder = resources.files("m3vit.hardware").joinpath(_PACKAGE_DIR)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_platform(name_or_path: str | os.PathLike) -> Platform:
    """A packaged platform by name (``zcu104``, ``zcu102``) or a user platform YAML file by path."""
    text = str(name_or_path)
    packaged = _packaged(text) if os.sep not in text and not text.endswith((".yaml", ".yml")) else None
    path = packaged or Path(text)
    if not path.is_file():
        raise PlatformError(f"platform {text!r} is neither a packaged platform ({', '.join(list_platforms())}) "
                            "nor an existing YAML file")
    source = path.name if packaged else str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PlatformError(f"{source}: not a YAML text file (it is not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        raise PlatformError(f"{source}: not valid YAML ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise PlatformError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return Platform.from_dict(data, source=source)
