"""SETR-PUP head on CPU: classifier order and memory layout, side by side.

What it measures
----------------
One ``m3vit.nn.SETRPUPHead`` (random weights, eval mode, ``torch.inference_mode()``) of a registered
model at its image size (default ``m3vit_small`` at 512x512: 384 wide, 256 head channels, four
stages, a 21-class classifier; batch 1), run four ways on the same tokens:

* ``classifier last, NCHW``            the order before issue 13: upsample, then the 1x1 classifier;
* ``classifier first, NCHW``           1x1 classifier before the last x2 upsampling (4x fewer pixels);
* ``classifier first, channels_last (weights too)``  the same with the feature maps and conv weights
  in NHWC (``channels_last``); the output is made contiguous (NCHW) at the end;
* ``classifier first, channels_last maps``  NHWC feature maps (the token grid is NHWC already, so the
  layout is free), conv weights left NCHW;
* ``... , NCHW last upsample``        as above, but the small classifier output goes back to NCHW before
  the last x2 upsampling;
* ``SETRPUPHead.forward``              what the library runs now.

Cases are timed round-robin (one call of each per round, the starting case rotating) after a warm-up,
in one process, and medians and minima are reported with their ratio to ``classifier last, NCHW``.
Every case is first checked against ``SETRPUPHead.forward`` (max abs difference printed). On a
shared machine read ``/proc/loadavg`` (printed) before trusting a ratio.

Run: ``.venv/bin/python benchmarks/head_layout.py [--model m3vit_small] [--img-size 512 512]
[--rounds 15] [--warmup 2] [--threads N] [--variants 1 4] [--out benchmarks/results/head_layout.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _env import environment, loadavg
import torch.nn.functional as F

import m3vit
from m3vit.utils.io import write_json

TASK, CLASSES = "semseg", 21


def _grid_input(head, tokens, grid, channels_last: bool):
    batch, _, dim = tokens.shape
    x = head.norm(tokens[:, 1:]).reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def run_variant(head, tokens, grid, out_size, classifier_first: bool, channels_last: bool,
                nchw_before_last_upsample: bool = False):
    """The head's forward with the classifier placed and the maps laid out as asked (same weights)."""
    x = _grid_input(head, tokens, grid, channels_last)
    last = len(head.stages) - 1
    for i, stage in enumerate(head.stages):
        x = stage(x)
        if i == last and classifier_first:
            x = head.classifier(x)
            if nchw_before_last_upsample:
                x = x.contiguous()
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if not classifier_first:
        x = head.classifier(x)
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    return x.contiguous()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default="m3vit_small")
    ap.add_argument("--img-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); default: torch's")
    ap.add_argument("--variants", nargs="+", type=int, metavar="I",
                    help="time only these variants (0-based, in the order listed above; 0 is always kept)")
    ap.add_argument("--out", default="benchmarks/results/head_layout.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = tuple(args.img_size)
    model = m3vit.create_model(args.model, {TASK: CLASSES}, img_size=size).eval()
    cfg, head = model.config, model.heads[TASK]
    grid = (size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    tokens = torch.randn(1, 1 + grid[0] * grid[1], cfg.embed_dim, generator=torch.Generator().manual_seed(1))
    head_cl = m3vit.create_model(args.model, {TASK: CLASSES}, img_size=size).eval().heads[TASK]
    head_cl.load_state_dict(head.state_dict())
    head_cl = head_cl.to(memory_format=torch.channels_last)
    cases = {
        "classifier last, NCHW": lambda: run_variant(head, tokens, grid, size, False, False),
        "classifier first, NCHW": lambda: run_variant(head, tokens, grid, size, True, False),
        "classifier first, channels_last (weights too)": lambda: run_variant(head_cl, tokens, grid, size, True, True),
        "classifier first, channels_last maps": lambda: run_variant(head, tokens, grid, size, True, True),
        "classifier first, channels_last maps, NCHW last upsample":
            lambda: run_variant(head, tokens, grid, size, True, True, True),
        "SETRPUPHead.forward": lambda: head(tokens, grid, size),
    }
    if args.variants:
        keep = sorted({0, *args.variants})
        bad = [i for i in keep if not 0 <= i < len(cases)]
        if bad:
            ap.error(f"--variants: {bad} out of range 0..{len(cases) - 1}")
        cases = {name: fn for i, (name, fn) in enumerate(cases.items()) if i in keep}
    load_before = loadavg()
    print(f"# SETR-PUP head: {args.model} {size[0]}x{size[1]}, batch 1, {CLASSES} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before}")
    times = {name: [] for name in cases}
    names = list(cases)
    with torch.inference_mode():
        reference = head(tokens, grid, size)
        max_diff = {name: float((fn() - reference).abs().max()) for name, fn in cases.items()}
        for name, diff in max_diff.items():
            print(f"  check {name}: max |diff| to SETRPUPHead.forward {diff:.2e}")
        for r in range(args.warmup + args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                cases[name]()
                if r >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    base = names[0]
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    print(f"\n| variant | median ms | min ms | median / {base} | min / {base} |\n|---|---:|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {med[n]:.1f} | {low[n]:.1f} | {med[n] / med[base]:.3f} | {low[n] / low[base]:.3f} |")
    load_after = loadavg()
    print(f"\nload average before {load_before}, after {load_after}")
    report = {"model": args.model, "img_size": list(size), "classes": CLASSES, "rounds": args.rounds,
              "warmup": args.warmup, **environment(),
              "loadavg_before": load_before, "loadavg_after": load_after, "max_abs_diff": max_diff,
              "median_ms": med, "min_ms": low, "runs_ms": times}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
