"""Statistics over repeated runs (training seeds): mean, sample standard deviation, bootstrap interval.

``bootstrap_interval`` is the percentile bootstrap of the mean: draw ``resamples`` samples of ``n``
values with replacement from the ``n`` observed values (a seeded ``numpy`` generator, so the interval is
reproducible), take each resample's mean, and report the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of those means (linear interpolation between order statistics, ``numpy.quantile``'s
default). With ``n = 1`` there is no spread to resample and the interval is undefined (``None``). With
very few values it is coarse: 3 values allow only 10 distinct resample means, and the interval cannot
be wider than the range of the values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mean_std", "bootstrap_interval", "summarize", "DEFAULT_RESAMPLES", "DEFAULT_LEVEL"]

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95


def _values(values: Sequence[float]) -> np.ndarray:
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ValueError(f"values must be a flat sequence of finite numbers, got {list(values)!r}")
    return array


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, sample standard deviation with n - 1)``; the std is ``None`` for a single value."""
    array = _values(values)
    if array.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def bootstrap_interval(values: Sequence[float], *, level: float = DEFAULT_LEVEL,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap ``level`` interval of the mean of ``values`` (see the module docstring);
    ``None`` with fewer than two values."""
    array = _values(values)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if array.size < 2:
        return None
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, array.size, size=(resamples, array.size))
    means = array[indices].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(values: Sequence[float | None], *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> dict[str, Any]:
    """``{"n", "mean", "std", "ci", "values", "missing"}`` of the finite values (``None`` and NaN are
    counted in ``missing`` and left out); ``std`` and ``ci`` are ``None`` when fewer than two remain,
    ``mean`` too when none does. ``ci`` is ``[low, high]`` of ``bootstrap_interval``."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    out: dict[str, Any] = {"n": len(kept), "mean": None, "std": None, "ci": None, "level": level,
                           "values": kept, "missing": len(values) - len(kept)}
    if kept:
        out["mean"], out["std"] = mean_std(kept)
        interval = bootstrap_interval(kept, level=level, resamples=resamples, seed=seed)
        out["ci"] = None if interval is None else list(interval)
    return out
