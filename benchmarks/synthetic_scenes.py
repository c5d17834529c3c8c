"""Throughput of ``m3vit.data.synthetic.SyntheticScenes`` on one CPU thread.

What it measures
----------------
``dataset[i]`` for ``i`` in ``0..N-1`` (train split, seed 0, all six labels), repeated ``R`` rounds in
one process after a short warm-up; the headline is the median over rounds of samples per second of
wall-clock time (CPU time of the process is reported too: on a shared machine it is the steadier one).
Per-stage CPU times (milliseconds per sample, medians over rounds) split ``dataset[i]`` into

* ``scene``   drawing the scene description (room, camera, people, objects, light);
* ``cast``    the vectorised ray cast (depth, primitive ids, normals);
* ``shade``   everything else: textures, shading, jitter, noise, the six labels, tensors.

Target: >= 100 samples/s at 128 x 128 on one core.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_scenes.py [--size H W] [--samples N]
[--repeats R] [--out PATH]``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy/torch start their thread pools

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from m3vit.data.synthetic import SyntheticScenes
from m3vit.utils.io import write_json

TARGET = 100.0


def _time(fn, clock) -> float:
    """Seconds ``fn()`` takes on ``clock``."""
    start = clock()
    fn()
    return clock() - start


def _timed(fn, totals: dict, key: str):
    """``fn`` that adds its CPU time to ``totals[key]``."""
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.process_time() - start
    return wrapper


def run(size: tuple[int, int], samples: int, repeats: int) -> dict:
    dataset = SyntheticScenes("train", size=size, length=samples, seed=0)
    indices = range(samples)

    def all_samples(ds):
        for i in indices:
            ds[i]  # dropped at once, as a training loop would

    for i in range(min(3, samples)):  # warm-up
        dataset[i]
    wall, cpu, stages = [], [], {"scene": [], "cast": [], "shade": []}
    # A second dataset whose scene sampling and ray cast report their time: the stage split comes from
    # the same calls (timer overhead included), the headline from the untouched one.
    probed = SyntheticScenes("train", size=size, length=samples, seed=0)
    totals = {"scene": 0.0, "cast": 0.0}
    probed.scene = _timed(probed.scene, totals, "scene")
    probed.ray_caster.cast = _timed(probed.ray_caster.cast, totals, "cast")
    for _ in range(repeats):
        wall.append(_time(lambda: all_samples(dataset), time.perf_counter))
        cpu.append(_time(lambda: all_samples(dataset), time.process_time))
        totals.update(scene=0.0, cast=0.0)
        total = _time(lambda: all_samples(probed), time.process_time)
        stages["scene"].append(totals["scene"])
        stages["cast"].append(totals["cast"])
        stages["shade"].append(total - totals["scene"] - totals["cast"])
    return {
        "size": list(size),
        "samples": samples,
        "repeats": repeats,
        "samples_per_s": samples / statistics.median(wall),
        "samples_per_s_rounds": [samples / t for t in wall],
        "cpu_samples_per_s": samples / statistics.median(cpu),
        "stage_ms_per_sample": {k: round(statistics.median(v) / samples * 1e3, 3) for k, v in stages.items()},
        "target_samples_per_s": TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--samples", type=int, default=200, help="samples per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (the median is reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic_scenes.json"))
    args = parser.parse_args()
    if args.samples < 1 or args.repeats < 1:
        parser.error("--samples and --repeats must be >= 1")
    torch.set_num_threads(1)
    try:
        result = run(tuple(args.size), args.samples, args.repeats)
    except ValueError as exc:  # e.g. a size below 16
        parser.error(str(exc))
    result["machine"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(args.out, result)
    stages = ", ".join(f"{k} {v:.2f}" for k, v in result["stage_ms_per_sample"].items())
    print(f"SyntheticScenes {args.size[0]}x{args.size[1]}: {result['samples_per_s']:.1f} samples/s wall "
          f"({result['cpu_samples_per_s']:.1f} by CPU time), ms/sample: {stages} -> {args.out}")


if __name__ == "__main__":
    main()
