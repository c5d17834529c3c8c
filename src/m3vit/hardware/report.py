"""Plain-text tables of a simulation (and of measured devices beside it) for the command line."""

from __future__ import annotations

from ..utils.tables import format_table

__all__ = ["simulation_text"]


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _table(headers: list[str], rows: list[list]) -> str:
    return format_table(headers, rows, cell=_cell)


def simulation_text(report: dict, measured: dict | None = None) -> str:
    """The header, design table, task-switch line and expert sweep of ``SimulationResult.to_dict()``;
    ``measured`` adds rows ``{name: {"latency_ms", "energy_j", "power_w", "scope"}}``."""
    model, plat = report["model"], report["platform"]
    h, w = model["img_size"]
    scope = "backbone + task head" if model["includes_heads"] else "backbone only"
    lines = [
        f"{model['name']} at {h}x{w}, task {model['task']} ({scope}, {model['tokens']} tokens, "
        f"{model['gmacs']:.2f} GMACs), {model['num_experts']} experts top-{model['top_k']} in blocks "
        f"{model['moe_blocks']}",
        f"{plat['name']}: {plat['macs_per_cycle']:.0f} MACs/cycle at {plat['clock_mhz']:.0f} MHz, DRAM "
        f"{plat['dram_bytes_per_cycle'] * plat['clock_mhz'] / 1e3:.1f} GB/s sustained, on-chip RAM "
        f"{plat['onchip_capacity_mib']:.2f} MiB, {plat['board_power_w']:g} W",
        f"routing: {report['routing']}"
        + (f"; token-by-token cache: {report['cache_experts']} experts (LRU)" if report["cache_experts"] else ""),
        "",
    ]
    rows = [[name, d["latency_ms"], d["cycles"], d["onchip_mib"], "yes" if d["fits_on_chip"] else "no",
             d["dram_mib"], d["energy_j"]] for name, d in report["designs"].items()]
    for name, m in (measured or {}).items():
        rows.append([f"{name} (measured, {m['scope']})", m["latency_ms"], None, None, None, None, m["energy_j"]])
    lines.append(_table(["design", "latency ms", "cycles", "on-chip MiB", "fits", "DRAM MiB", "energy J"], rows))
    switch = report["task_switch"]
    if switch["router_bytes"]:
        lines.append("")
        lines.append(f"task switch: reload {switch['bytes'] / 1024:.1f} KiB (routers"
                     + (" + head" if switch["head_bytes"] else "") + f") = {switch['cycles']:,.0f} cycles "
                     f"({switch['us']:.1f} us); keeping one task's experts resident instead would reload "
                     f"{switch['all_experts_bytes'] / 2**20:.1f} MiB ({switch['all_experts_us']:,.0f} us)")
    if report.get("expert_sweep"):
        names = list(report["expert_sweep"][0]["designs"])
        lines.append("")
        lines.append("on-chip MiB / latency ms as the number of experts grows (synthetic routing):")
        lines.append(_table(["experts"] + names, [
            [str(row["experts"])] + [f"{row['designs'][n]['onchip_mib']:.2f} / {row['designs'][n]['latency_ms']:.1f}"
                                     for n in names] for row in report["expert_sweep"]]))
    return "\n".join(lines)
