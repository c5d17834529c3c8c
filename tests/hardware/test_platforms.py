"""Platform files: the packaged boards, derived quantities, and one-line validation errors."""

import math

import pytest
import yaml

from m3vit.hardware import Platform, PlatformError, list_platforms, load_platform


def _zcu104_dict() -> dict:
    return load_platform("zcu104").to_dict()


def test_packaged_platforms_carry_the_datasheet_figures():
    assert {"zcu104", "zcu102"} <= set(list_platforms())
    zcu104, zcu102 = load_platform("zcu104"), load_platform("zcu102")
    # XCZU7EV: 1728 DSPs, 11 Mb BRAM + 27 Mb URAM; XCZU9EG: 2520 DSPs, 32.1 Mb BRAM, no URAM
    assert (zcu104.dsp_slices, zcu104.bram_mbit, zcu104.uram_mbit) == (1728, 11.0, 27.0)
    assert (zcu102.dsp_slices, zcu102.bram_mbit, zcu102.uram_mbit) == (2520, 32.1, 0.0)
    # 64-bit DDR4 at 2400 MT/s, 300 MHz, 10 W as the paper counts the board
    assert zcu104.dram_bandwidth_gbs == pytest.approx(64 / 8 * 2400e6 / 1e9)
    assert (zcu104.clock_mhz, zcu104.board_power_w) == (300, 10)


def test_derived_quantities():
    p = load_platform("zcu104")
    assert p.macs_per_cycle == pytest.approx(1728 * 1 * p.pe_utilisation)
    assert p.onchip_capacity_bytes == pytest.approx(38 * 2**20 / 8)  # 38 Mb = 4.75 MiB
    assert p.dram_bytes_per_cycle == pytest.approx(19.2e9 * p.dram_efficiency / 300e6)
    assert p.weight_bytes == 2


def test_user_platform_file(tmp_path):
    data = _zcu104_dict() | {"name": "mine", "dsp_slices": 100}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_platform(str(path)).dsp_slices == 100


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("dsp_slices"), "missing key(s) ['dsp_slices']"),
    (lambda d: d.update(clock_mhz=-300), "clock_mhz must be > 0, got -300"),
    (lambda d: d.update(uram_mbit=-1), "uram_mbit must be >= 0"),
    (lambda d: d.update(pe_utilisation=1.5), "pe_utilisation is a fraction"),
    (lambda d: d.update(dsp_slices=10.5), "dsp_slices must be a whole number"),
    (lambda d: d.update(board_power_w="ten"), "board_power_w must be a number"),
    (lambda d: d.update(dram_bw=3), "unknown key(s) ['dram_bw']"),
])
def test_validation_errors_name_the_key(tmp_path, change, message):
    data = _zcu104_dict()
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlatformError) as err:
        load_platform(str(path))
    text = str(err.value)
    assert message in text and "\n" not in text and "bad.yaml" in text


def test_unreadable_platforms(tmp_path):
    with pytest.raises(PlatformError, match="neither a packaged platform"):
        load_platform("zcu999")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(PlatformError, match="not valid YAML"):
        load_platform(str(bad))
    bad.write_text("- a list")
    with pytest.raises(PlatformError, match="must be a YAML mapping"):
        load_platform(str(bad))
    with pytest.raises(PlatformError):
        Platform.from_dict({})


# ---------------------------------------------------------------------------------------------
# Every number finite and in range, so nothing overflows or divides by zero later
# ---------------------------------------------------------------------------------------------
def _write(tmp_path, text: str):
    path = tmp_path / "board.yaml"
    path.write_text(text)
    return path


def _with(key: str, literal: str) -> str:
    """The zcu104 file as YAML text with ``key: literal`` (the literal as a user would type it)."""
    data = _zcu104_dict()
    lines = [f"{k}: {literal if k == key else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in data.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key, literal, fragment", [
    ("clock_mhz", "1e308", "clock_mhz must be in [1, 10000], got 1e+308"),  # YAML 1.1 reads 1e308 as a string
    ("clock_mhz", "1.0e+308", "clock_mhz must be in [1, 10000]"),
    ("dram_bandwidth_gbs", "1.0e-300", "dram_bandwidth_gbs must be in [0.001, 100000]"),
    ("dram_bandwidth_gbs", "5e-324", "dram_bandwidth_gbs must be in [0.001, 100000]"),
    ("pe_utilisation", "1.0e-300", "pe_utilisation must be in [0.001, 1]"),
    ("board_power_w", ".nan", "board_power_w must be a finite number"),
    ("dsp_slices", ".inf", "dsp_slices must be a finite number"),
    ("weight_bits", "4096", "weight_bits must be in [1, 64]"),
])
def test_out_of_range_numbers_are_refused(tmp_path, key, literal, fragment):
    path = _write(tmp_path, _with(key, literal))
    with pytest.raises(PlatformError) as err:
        load_platform(str(path))
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message, message


def test_extreme_but_allowed_platforms_simulate_finitely(tmp_path):
    """The corners of every range give finite latency, traffic and energy for a real model."""
    from m3vit.hardware import simulate
    from m3vit.hardware.spec import LIMITS
    from m3vit.models import model_config

    data = _zcu104_dict()
    slow = {k: (lo if k not in ("clock_mhz",) else hi) for k, (lo, hi) in LIMITS.items()}
    fast = {k: (hi if k not in ("clock_mhz",) else lo) for k, (lo, hi) in LIMITS.items()}
    cfg = model_config("m3vit_small", ["semseg"], (512, 512))
    for corner in (slow, fast):
        platform = Platform.from_dict(data | corner, source="corner")
        for design in simulate(cfg, platform).designs.values():
            for value in (design.latency_ms, design.energy_j, design.dram_bytes, design.onchip_mib):
                assert math.isfinite(value) and value >= 0


def test_yaml_number_strings_are_numbers(tmp_path):
    path = _write(tmp_path, _with("clock_mhz", "3e2"))
    assert load_platform(str(path)).clock_mhz == 300.0


def test_a_binary_platform_file_names_the_file(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PlatformError) as err:
        load_platform(str(path))
    assert str(err.value) == f"{path}: not a YAML text file (it is not UTF-8 text)"


def test_platform_errors_are_config_errors():
    from m3vit.utils.errors import ConfigError

    assert issubclass(PlatformError, ConfigError)
