"""Roofline of one task: achieved GFLOP/s per model component against this machine's fp32 GEMM peak.

What it measures
----------------
* **Peak**: ``torch.matmul`` of two square fp32 matrices (``--gemm-sizes``, default 1024, 2048 and
  3072), with the threads as given (``--threads``, else torch's default); the best GFLOP/s over the
  sizes and ``--gemm-repeats`` calls each (``2 n^3`` FLOPs a call) is the peak.
* **Model**: a random-weight registered model (default ``m3vit_small`` at 512x512, batch 1, task
  ``semseg`` with 21 classes), eval mode under ``torch.inference_mode()``, one task's pathway. Time per
  component comes from forward pre/post hooks (``time.perf_counter``; on CUDA the hooks synchronise):
  ``patch embed`` (``backbone.patch_embed``), ``attention`` (every ``blocks.i.attn``), ``MLP / experts``
  (every ``blocks.i.mlp``: dense MLPs, and for MoE blocks the router, dispatch and experts), ``head convs``
  (the head's conv3x3+BN+ReLU stages and 1x1 classifier), ``head rest`` (its LayerNorm and bilinear
  upsamplings: memory-bound, no counted FLOPs) and ``other`` (the whole forward minus all of these:
  norms, residuals, positional embedding, routing glue). Medians over ``--repeats`` forwards after
  ``--warmup``. FLOPs come from ``m3vit.count_flops`` (what executes; 2 per multiply-add), split the same
  way (head FLOPs all count as ``head convs``).

Each component's achieved GFLOP/s and its percentage of the peak are printed as a markdown table and
written as JSON. The efficiency issue's target is whole-model throughput >= 60% of the GEMM peak.
Timing with hooks adds a few microseconds per hooked call (about 40 hooks a forward): negligible here.
On a shared machine these figures are noise: read the load average (printed) before trusting them.

Run: ``.venv/bin/python benchmarks/roofline.py [--model m3vit_small] [--img-size 512 512] [--repeats 5]
[--warmup 1] [--threads N] [--device cpu|cuda] [--out benchmarks/results/roofline.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from _env import environment, loadavg, sync

import m3vit
from m3vit.utils.io import write_json

TASK, CLASSES = "semseg", 21
COMPONENTS = ("patch embed", "attention", "MLP / experts", "head convs", "head rest", "other")


def gemm_peak(sizes: list[int], repeats: int, device: torch.device) -> dict:
    """Best fp32 ``torch.matmul`` GFLOP/s over square sizes (each: one warm-up, then ``repeats`` calls)."""
    gen = torch.Generator().manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device)
        b = torch.randn(n, n, generator=gen).to(device)
        torch.matmul(a, b)
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            times.append(time.perf_counter() - start)
        by_size[n] = {"best_gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / statistics.median(times) / 1e9}
        print(f"  GEMM {n}x{n}: best {by_size[n]['best_gflops']:.1f} GFLOP/s, "
              f"median {by_size[n]['median_gflops']:.1f} GFLOP/s", flush=True)
    return {"peak_gflops": max(v["best_gflops"] for v in by_size.values()), "by_size": by_size}


class ComponentTimer:
    """Forward pre/post hooks that add each hooked module's wall time to its component's total."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._starts: dict[int, float] = {}
        self._handles = []

    def watch(self, module: torch.nn.Module, component: str) -> None:
        def pre(mod, args):
            sync(self.device)
            self._starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            sync(self.device)
            self.totals[component] += time.perf_counter() - self._starts.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def hook_components(model, timer: ComponentTimer) -> None:
    backbone, head = model.backbone, model.heads[TASK]
    timer.watch(backbone.patch_embed, "patch embed")
    for block in backbone.blocks:
        timer.watch(block.attn, "attention")
        timer.watch(block.mlp, "MLP / experts")
    for stage in head.stages:
        timer.watch(stage, "head convs")
    timer.watch(head.classifier, "head convs")
    timer.watch(head, "head (whole)")


def component_flops(model, img_size) -> dict[str, float]:
    report = m3vit.count_flops(model, img_size, tasks=[TASK])
    parts = report.by_task[TASK]["by_component"]
    flops = {"patch embed": parts["patch_embed"], "attention": parts["attention"],
             "MLP / experts": parts["dense_mlp"] + parts["router"] + parts["experts"],
             "head convs": parts["decoder"], "head rest": 0.0, "other": parts["other"]}
    return {"gflop": flops, "total_gflop": report.by_task[TASK]["gflops"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default="m3vit_small")
    ap.add_argument("--img-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards (medians)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gemm-sizes", type=int, nargs="+", default=[1024, 2048, 3072])
    ap.add_argument("--gemm-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); default: torch's")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="benchmarks/results/roofline.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    device = torch.device(args.device)
    size = tuple(args.img_size)
    load_before = loadavg()
    print(f"# roofline: {args.model} {size[0]}x{size[1]}, batch 1, one task ({TASK}), {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before}")
    peak = gemm_peak(args.gemm_sizes, args.gemm_repeats, device)

    torch.manual_seed(0)
    model = m3vit.create_model(args.model, {TASK: CLASSES}, img_size=size).eval().to(device)
    flops = component_flops(model, size)
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    timer = ComponentTimer(device)
    hook_components(model, timer)
    rounds = []
    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            timer.reset()
            sync(device)
            start = time.perf_counter()
            model(images, tasks=[TASK])
            sync(device)
            total = time.perf_counter() - start
            if r >= args.warmup:
                t = dict(timer.totals)
                t["head rest"] = t.pop("head (whole)") - t["head convs"]
                t["other"] = total - sum(t[c] for c in COMPONENTS if c != "other")
                t["whole model"] = total
                rounds.append(t)
    timer.remove()
    seconds = {c: statistics.median(r[c] for r in rounds) for c in (*COMPONENTS, "whole model")}
    gflop = dict(flops["gflop"], **{"whole model": flops["total_gflop"]})
    rows = []
    for c in (*COMPONENTS, "whole model"):
        rate = gflop[c] / seconds[c] if seconds[c] > 0 else 0.0
        rows.append({"component": c, "gflop": gflop[c], "median_ms": 1e3 * seconds[c],
                     "time_share": seconds[c] / seconds["whole model"], "gflops_per_s": rate,
                     "percent_of_peak": 100 * rate / peak["peak_gflops"]})
    load_after = loadavg()
    print(f"\nfp32 GEMM peak {peak['peak_gflops']:.1f} GFLOP/s ({args.device}, {torch.get_num_threads()} threads)\n")
    print("| component | GFLOP | median ms | share of time | GFLOP/s | % of GEMM peak |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['component']} | {row['gflop']:.2f} | {row['median_ms']:.1f} | {100 * row['time_share']:.0f}% | "
              f"{row['gflops_per_s']:.1f} | {row['percent_of_peak']:.0f}% |")
    print(f"\nload average before {load_before}, after {load_after}")
    report = {"model": args.model, "img_size": list(size), "task": TASK, "classes": CLASSES, "device": args.device,
              **environment(), "repeats": args.repeats, "warmup": args.warmup, "gemm": peak,
              "components": rows, "runs_s": rounds, "loadavg_before": load_before, "loadavg_after": load_after}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
