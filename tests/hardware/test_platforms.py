"""Platform files: the packaged boards, derived quantities, and one-line validation errors."""

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
