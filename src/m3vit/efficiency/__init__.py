"""Efficiency tools: FLOPs counting of what actually executes (and, later, latency and export)."""

from .flops import COMPONENTS, FlopReport, count_flops
from .latency import measure_latency

__all__ = ["COMPONENTS", "FlopReport", "count_flops", "measure_latency"]
