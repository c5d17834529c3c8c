"""One task's latency: M³ViT against the dense M-ViT of the same active compute, side by side.

What it measures
----------------
For each size (``micro`` at 128x128, ``tiny`` at 224x224, ``small`` at 512x512) the registered
``m3vit_<size>`` and ``mvit_<size>`` models (random weights, the five PASCAL-Context tasks) run ONE
task's pathway (``model(images, tasks=["semseg"])``: its router, the experts it picks, its head) at
batch 1 in eval mode under ``torch.inference_mode()``. Both models of a size are timed in the same
process, round-robin (one call of each per round, the starting model alternating) after a warm-up,
and the medians are compared: the target of the efficiency issue is m3vit/mvit <= 1.05x in eager
PyTorch and <= 1.10x under ``torch.compile`` (``--compile``). A per-component split (backbone MoE
layers vs dense MLPs) is not attempted here: ``benchmarks/moe_dispatch.py`` times one layer.

Run: ``.venv/bin/python benchmarks/latency.py [--sizes micro tiny small] [--rounds 21] [--threads 2]
[--compile [--backend inductor]] [--device cpu|cuda] [--out benchmarks/results/latency.json]``. Check ``cat /proc/loadavg`` first: with other
work on the 2 cores the ratios are noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from _env import loadavg, sync

import m3vit
from m3vit.nn.compile import compile_model, default_backend
from m3vit.utils.io import write_json

SIZES = {"micro": 128, "tiny": 224, "small": 512}
TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]


def _build(name: str, side: int, backend: str | None, device: torch.device = torch.device("cpu")):
    """The model in eval mode on ``device``; compiled with ``m3vit.nn.compile_model`` (no graph break in the
    MoE layers: the dispatch is the op ``m3vit::moe_experts``) when ``backend`` is given."""
    torch.manual_seed(0)
    model = m3vit.create_model(name, TASKS, img_size=(side, side)).eval().to(device)
    if backend is not None:
        model = compile_model(model, backend=backend)
    return model


def bench_size(size: str, rounds: int, warmup: int, task: str, compiled: bool, backend: str | None = None,
               device: torch.device = torch.device("cpu")) -> dict:
    side = SIZES[size]
    backend = (backend or default_backend(device)) if compiled else None
    models = {f"m3vit_{size}": _build(f"m3vit_{size}", side, backend, device),
              f"mvit_{size}": _build(f"mvit_{size}", side, backend, device)}
    images = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    times = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        compile_s = {}
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(warmup):
                model(images, tasks=[task])
            sync(device)
            compile_s[name] = time.perf_counter() - start
        max_allocated = {}
        if device.type == "cuda":  # one more forward of each model alone: its peak CUDA memory
            for name, model in models.items():
                torch.cuda.reset_peak_memory_stats(device)
                model(images, tasks=[task])
                sync(device)
                max_allocated[name] = torch.cuda.max_memory_allocated(device)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                sync(device)
                start = time.perf_counter()
                models[name](images, tasks=[task])
                sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
    moe, dense = names
    medians = {n: statistics.median(t) for n, t in times.items()}
    return {"size": size, "img_size": side, "task": task, "compiled": compiled, "backend": backend,
            "rounds": rounds,
            "median_ms": medians, "min_ms": {n: min(t) for n, t in times.items()}, "runs_ms": times,
            "warmup_s": compile_s, "ratio": medians[moe] / medians[dense], "device": str(device),
            "cuda_max_allocated": max_allocated}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", default="semseg", choices=TASKS)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (m3vit.nn.compile_model)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor, or aot_eager on a "
                                                     "CPU machine without a C++ compiler)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: synchronised timing and each model's torch.cuda.max_memory_allocated")
    ap.add_argument("--out", default="benchmarks/results/latency.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    print(f"# one-task latency, batch 1, {args.device}, torch {torch.__version__}, {args.threads} threads; "
          f"load {load_before}")
    results = []
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        for size in args.sizes:
            r = bench_size(size, args.rounds, args.warmup, args.task, compiled, args.backend, device)
            results.append(r)
            (moe, m_ms), (dense, d_ms) = r["median_ms"].items()
            print(f"{'compiled' if compiled else 'eager':8s} {size:5s} {r['img_size']}²: {moe} {m_ms:8.2f} ms  "
                  f"{dense} {d_ms:8.2f} ms  ratio {r['ratio']:.3f}", flush=True)
    load_after = loadavg()
    out = {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]), "torch": torch.__version__,
           "threads": args.threads, "cpu": platform.processor() or platform.machine(), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "loadavg_before": load_before, "loadavg_after": load_after, "results": results}
    write_json(args.out, out)
    print("\n| mode | size | m3vit ms | mvit ms | m3vit / mvit |\n|---|---|---:|---:|---:|")
    for r in results:
        (_, m_ms), (_, d_ms) = r["median_ms"].items()
        print(f"| {'compiled' if r['compiled'] else 'eager'} | {r['size']} {r['img_size']}² | {m_ms:.2f} | "
              f"{d_ms:.2f} | {r['ratio']:.3f}x |")
    print(f"\nload average before {load_before}, after {load_after}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
