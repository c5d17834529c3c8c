"""Statistics over seeds: sample std, the percentile bootstrap against a plain loop and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.analysis import bootstrap_interval, mean_std, summarize


def _loop_interval(values, resamples, level, seed):
    """Plain loops over the same index draws: each resample's mean, sorted, then the percentile by
    linear interpolation between order statistics at position q * (R - 1)."""
    indices = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in indices.tolist())

    def percentile(q):
        position = q * (len(means) - 1)
        low = math.floor(position)
        high = min(low + 1, len(means) - 1)
        return means[low] + (means[high] - means[low]) * (position - low)

    return percentile((1 - level) / 2), percentile((1 + level) / 2)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=6),
       level=st.sampled_from([0.9, 0.95]), seed=st.integers(0, 5))
def test_bootstrap_matches_a_plain_loop(values, level, seed):
    low, high = bootstrap_interval(values, level=level, resamples=500, seed=seed)
    ref_low, ref_high = _loop_interval(values, 500, level, seed)
    assert low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9)
    assert min(values) - 1e-9 <= low <= high <= max(values) + 1e-9


def test_bootstrap_known_answers():
    assert bootstrap_interval([2.5, 2.5, 2.5]) == (2.5, 2.5)
    # two values: resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> the 2.5% and 97.5% points are 0 and 1
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # many normal values: the percentile interval approaches mean ± 1.96 s / sqrt(n)
    values = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    low, high = bootstrap_interval(values, resamples=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.04)
    assert high == pytest.approx(values.mean() + half, abs=0.04)
    # reproducible by seed, different across seeds
    data = [1.0, 4.0, 2.0, 8.0]
    assert bootstrap_interval(data, seed=3) == bootstrap_interval(data, seed=3)
    assert bootstrap_interval(data, seed=3, resamples=50) != bootstrap_interval(data, seed=4, resamples=50)


def test_one_value_has_no_interval_and_no_std():
    assert bootstrap_interval([1.0]) is None
    assert mean_std([4.0]) == (4.0, None)
    out = summarize([4.0, None, float("nan")])
    assert out["n"] == 1 and out["mean"] == 4.0 and out["std"] is None and out["ci"] is None and out["missing"] == 2
    assert summarize([])["mean"] is None


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    out = summarize([1.0, 2.0, 4.0], resamples=100)
    assert out["std"] == pytest.approx(std) and len(out["ci"]) == 2 and out["values"] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(values=[1.0, float("inf")]), "finite numbers"),
    (dict(values=[1.0, 2.0], level=1.0), "level must be in (0, 1)"),
    (dict(values=[1.0, 2.0], resamples=0), "resamples must be >= 1"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        bootstrap_interval(**kwargs)
    assert fragment in str(err.value)
