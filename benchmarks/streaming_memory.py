"""Expert streaming: peak memory and latency of a resident model against one streaming its experts from the file.

What it measures
----------------
For each expert count (default 16 and 64) a random-weight ``m3vit_base`` (768 wide, 12 blocks, MoE in
blocks 1,3,...,11, top-4, expert hidden = 768, one task ``semseg`` with 21 classes) is saved to a
temporary checkpoint. Memory is measured with one forward of one 512x512 image (batch 1, one task)
in a fresh subprocess per variant, so that no measurement inherits another's memory:

* ``baseline``   imports torch and m3vit and makes the input image: the floor every process pays;
* ``resident``   ``m3vit.load_checkpoint`` (every weight in memory);
* ``streaming``  ``m3vit.efficiency.load_streaming_model`` (non-expert weights in memory, experts read
                 per MoE layer into two buffers by a background reader);
* ``streaming (no prefetch)`` the same without the background reader.

Per run: peak RSS (``ru_maxrss`` of the subprocess, loading included), RSS after the forward
(``VmRSS``), the bytes of weights held in memory (parameters + buffers, plus the two expert buffers
when streaming), and on CUDA ``torch.cuda.max_memory_allocated``. Ratios are resident / streaming for
peak RSS, peak RSS above the baseline process, steady RSS above baseline, and weight bytes.

Latency is measured apart, in one more process holding every variant (plus the resident model with
its dispatch forced to ``per_expert``, the same GEMMs streaming runs, and forced to ``batched``, to
check what ``dispatch="auto"`` picks) and timing them round-robin,
``--warmup`` then ``--repeats`` rounds, so that drift in the machine's load affects them alike;
medians and minima are reported (on a shared machine the minimum is the
better estimate of the uncontended cost).

What a deployer sees (``--cli-experts``, default 64 experts): ``m3vit infer --stream-experts`` on
the MoE checkpoint against ``m3vit infer`` on ``--dense-model`` (default ``mvit_base``, the dense model
of the same active compute, resident), and ``m3vit infer`` on the MoE checkpoint resident, each a
fresh process on one 512x512 PNG; peak RSS of that process (``os.wait4``) and its wall time. Targets
of the efficiency issue: streaming/dense peak RSS <= 1.15x, and streaming latency <= 1.10x of the
resident model with per-expert dispatch (``latency`` above).

Before anything is written the script checks free disk (1.2x the largest checkpoint) and available
memory (4x: the latency process holds three resident copies).

Caveats: the checkpoint file was just written, so expert reads come from the page cache, not the
disk (a cold read from an SSD would add its bandwidth's worth of time to the streaming latency;
the page cache is the kernel's and is not in the process's RSS). ``load_checkpoint`` peaks above the
weights' size while it loads (the model's random init plus the loaded state dict); the RSS after the
forward shows the steady state.

Run: ``.venv/bin/python benchmarks/streaming_memory.py [--experts 16 64] [--img-size 512 512]
[--repeats 5] [--warmup 1] [--device cpu|cuda] [--cli-experts 64] [--dense-model mvit_base]
[--out benchmarks/results/streaming_memory.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("baseline", "resident", "streaming", "streaming (no prefetch)")
RSS_TARGET, LATENCY_TARGET = 1.15, 1.10  # issue 13: streaming / dense resident peak RSS; / resident per-expert
TASK, CLASSES = "semseg", 21
MIB = 2**20


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------
def child_make_checkpoint(args) -> dict:
    import torch

    import m3vit

    torch.manual_seed(0)
    overrides = {} if args.num_experts is None else {"num_experts": args.num_experts}
    model = m3vit.create_model(args.model, {TASK: CLASSES}, img_size=tuple(args.img_size), **overrides)
    m3vit.save_checkpoint(model, args.checkpoint)
    return {"params": sum(p.numel() for p in model.parameters())}


def child_measure(args) -> dict:
    import torch

    import m3vit
    from m3vit.efficiency import load_streaming_model
    from m3vit.efficiency.streaming import expert_weight_bytes

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, *args.img_size, generator=gen).to(device)
    out = {"mode": args.mode}
    if args.mode == "baseline":
        out.update(peak_rss=_peak_rss_bytes(), rss_after=_vm_rss_bytes(), weight_bytes=0)
        return out
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if args.mode == "resident":
        model = m3vit.load_checkpoint(args.checkpoint, map_location=device)
        weight_bytes = expert_weight_bytes(model)[0]
    else:
        model = load_streaming_model(args.checkpoint, map_location=device, prefetch=args.mode == "streaming")
        weight_bytes = expert_weight_bytes(model)[0] + model.expert_streamer.buffer_bytes
    out["load_s"] = time.perf_counter() - start
    out["rss_after_load"] = _vm_rss_bytes()
    with torch.inference_mode():
        first_ms = _timed_forward(model, images, device)
    out.update(peak_rss=_peak_rss_bytes(), rss_after=_vm_rss_bytes(), weight_bytes=weight_bytes,
               first_forward_ms=first_ms, threads=torch.get_num_threads())
    if args.mode != "resident":
        stats = model.expert_streamer.stats
        out.update(expert_reads_per_forward=stats.loads, mib_read_per_forward=stats.bytes_read / MIB,
                   peak_live_buffers=stats.peak_live)
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def _timed_forward(model, images, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(images, tasks=[TASK])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def child_latency(args) -> dict:
    """Every variant loaded in one process and timed round-robin, so that drift in the machine's load
    affects them alike (memory is measured in the separate processes, not here)."""
    import torch

    import m3vit
    from m3vit.efficiency import load_streaming_model

    device = torch.device(args.device)
    images = torch.randn(1, 3, *args.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    resident = m3vit.load_checkpoint(args.checkpoint, map_location=device)
    per_expert = m3vit.load_checkpoint(args.checkpoint, map_location=device)
    batched = m3vit.load_checkpoint(args.checkpoint, map_location=device)
    for model, dispatch in ((per_expert, "per_expert"), (batched, "batched")):
        for layer in model.moe_layers:
            layer.dispatch = dispatch
    models = {"resident": resident, "resident (per-expert dispatch)": per_expert,
              "resident (batched dispatch)": batched,
              "streaming": load_streaming_model(args.checkpoint, map_location=device, prefetch=True),
              "streaming (no prefetch)": load_streaming_model(args.checkpoint, map_location=device, prefetch=False)}
    runs = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            for name, model in models.items():
                ms = _timed_forward(model, images, device)
                if round_ >= args.warmup:
                    runs[name].append(ms)
    dispatch = sorted({m3vit.nn.dispatch.choose_strategy(
        m3vit.nn.dispatch.plan_dispatch(layer.last_routing["indices"], layer.num_experts),
        layer.w1.shape[1], layer.w1.shape[2]) for layer in resident.moe_layers})
    return {"median_ms": {n: statistics.median(r) for n, r in runs.items()},
            "min_ms": {n: min(r) for n, r in runs.items()}, "runs_ms": runs,
            "resident_auto_dispatch": dispatch, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------
def _child(argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv[:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_cli_infer(label: str, argv: list[str], device: str) -> dict:
    """``m3vit infer`` in a fresh process: its peak RSS (``wait4``'s ``ru_maxrss``, this process only) and
    wall time (interpreter start, imports, loading, one image, writing the PNG)."""
    cmd = [sys.executable, "-m", "m3vit", "infer", "--device", device, *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 first (it reaps the child and gives its own rusage); the pipes hold a few lines at most.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    print(f"  m3vit infer, {label:40s} peak RSS {usage.ru_maxrss * 1024 / MIB:8.0f} MiB, wall {wall:6.1f} s", flush=True)
    return {"label": label, "command": " ".join(cmd[1:]), "peak_rss": usage.ru_maxrss * 1024, "wall_s": wall,
            "stdout": stdout.strip()}


def bench_cli_infer(args, moe_ckpt: Path, num_experts: int, workdir: Path) -> dict:
    """What a deployer sees: ``m3vit infer --stream-experts`` on the MoE checkpoint against ``m3vit infer``
    on the dense model of the same active compute (``--dense-model``), each in a fresh process, one
    image at the model's size; the MoE model resident too, for reference."""
    from PIL import Image

    import numpy as np

    dense_ckpt = workdir / args.dense_model
    _child(["--child", "make", "--model", args.dense_model, "--img-size", *map(str, args.img_size),
            "--checkpoint", str(dense_ckpt)])
    image = workdir / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (*args.img_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    common = ["--task", TASK, str(image)]
    runs = {
        "streaming": _run_cli_infer(f"{args.model} E{num_experts} --stream-experts",
                                    ["--checkpoint", str(moe_ckpt), "--stream-experts",
                                     "--out", str(workdir / "out-streaming"), *common], args.device),
        "dense resident": _run_cli_infer(f"{args.dense_model} (resident)",
                                         ["--checkpoint", str(dense_ckpt), "--out", str(workdir / "out-dense"),
                                          *common], args.device),
        "resident": _run_cli_infer(f"{args.model} E{num_experts} (resident)",
                                   ["--checkpoint", str(moe_ckpt), "--out", str(workdir / "out-resident"),
                                    *common], args.device),
    }
    dense_bytes = (dense_ckpt / "model.safetensors").stat().st_size
    shutil.rmtree(dense_ckpt, ignore_errors=True)
    ratio = runs["streaming"]["peak_rss"] / runs["dense resident"]["peak_rss"]
    print(f"  m3vit infer peak RSS: {args.model} E{num_experts} streaming / {args.dense_model} resident = "
          f"{ratio:.2f}x (target <= {RSS_TARGET:.2f}x)", flush=True)
    return {"model": args.model, "num_experts": num_experts, "dense_model": args.dense_model, "runs": runs,
            "dense_checkpoint_bytes": dense_bytes, "streaming_over_dense_peak_rss": ratio,
            "resident_over_dense_peak_rss": runs["resident"]["peak_rss"] / runs["dense resident"]["peak_rss"],
            "target_peak_rss_ratio": RSS_TARGET, "meets_target": ratio <= RSS_TARGET}


def bench_experts(args, num_experts: int, workdir: Path) -> dict:
    ckpt = workdir / f"{args.model}-e{num_experts}"
    common = ["--model", args.model, "--img-size", *map(str, args.img_size), "--checkpoint", str(ckpt)]
    made = _child(["--child", "make", "--num-experts", str(num_experts), *common])
    file_bytes = (ckpt / "model.safetensors").stat().st_size
    runs = {}
    for mode in MODES:
        runs[mode] = _child(["--child", "measure", "--mode", mode, "--device", args.device, *common])
        print(f"  E={num_experts:3d} {mode:24s} peak RSS {runs[mode]['peak_rss'] / MIB:8.0f} MiB", flush=True)
    latency = None
    if args.repeats:
        latency = _child(["--child", "latency", "--device", args.device, "--warmup", str(args.warmup),
                          "--repeats", str(args.repeats), *common])
        for mode, ms in latency["median_ms"].items():
            print(f"  E={num_experts:3d} {mode:30s} median {ms:8.0f} ms, min {latency['min_ms'][mode]:8.0f} ms",
                  flush=True)
            if mode in runs:
                runs[mode].update(median_ms=ms, min_ms=latency["min_ms"][mode])
    cli = bench_cli_infer(args, ckpt, num_experts, workdir) if num_experts in (args.cli_experts or []) else None
    shutil.rmtree(ckpt, ignore_errors=True)
    base, res, stream = runs["baseline"], runs["resident"], runs["streaming"]

    def ratio(a, b):
        return a / b if b else None

    summary = {
        "peak_rss_ratio": ratio(res["peak_rss"], stream["peak_rss"]),
        "peak_rss_above_baseline_ratio": ratio(res["peak_rss"] - base["peak_rss"],
                                               stream["peak_rss"] - base["peak_rss"]),
        "steady_rss_above_baseline_ratio": ratio(res["rss_after"] - base["rss_after"],
                                                 stream["rss_after"] - base["rss_after"]),
        "weight_bytes_ratio": ratio(res["weight_bytes"], stream["weight_bytes"]),
    }
    if latency:
        for stat in ("median", "min"):
            ms = latency[f"{stat}_ms"]
            summary[f"latency_{stat}"] = {
                "streaming/resident": ratio(ms["streaming"], ms["resident"]),
                "streaming/resident_per_expert": ratio(ms["streaming"], ms["resident (per-expert dispatch)"]),
                "no_prefetch/resident": ratio(ms["streaming (no prefetch)"], ms["resident"]),
                "resident_batched/resident_per_expert": ratio(ms["resident (batched dispatch)"],
                                                              ms["resident (per-expert dispatch)"]),
            }
        summary["latency_target_streaming/resident_per_expert"] = LATENCY_TARGET
    if "cuda_max_allocated" in res:
        summary["cuda_max_allocated_ratio"] = ratio(res["cuda_max_allocated"], stream["cuda_max_allocated"])
    return {"num_experts": num_experts, "params": made["params"], "checkpoint_bytes": file_bytes, "runs": runs,
            "latency": latency, "summary": summary, "cli_infer": cli}


def table(results: list[dict]) -> str:
    headers = ["experts", "mode", "peak RSS MiB", "above baseline", "RSS after fwd", "weights MiB",
               "latency ms (median / min)"]
    rows = []
    for r in results:
        base = r["runs"]["baseline"]
        for mode, run in r["runs"].items():
            rows.append([str(r["num_experts"]), mode, f"{run['peak_rss'] / MIB:.0f}",
                         "-" if mode == "baseline" else f"{(run['peak_rss'] - base['peak_rss']) / MIB:.0f}",
                         f"{run['rss_after'] / MIB:.0f}", f"{run['weight_bytes'] / MIB:.0f}",
                         f"{run['median_ms']:.0f} / {run['min_ms']:.0f}" if "median_ms" in run else "-"])
        if r.get("latency"):
            for name in ("resident (per-expert dispatch)", "resident (batched dispatch)"):
                med, low = r["latency"]["median_ms"][name], r["latency"]["min_ms"][name]
                rows.append([str(r["num_experts"]), name, "", "", "", "", f"{med:.0f} / {low:.0f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines.append("")
    for r in results:
        s = r["summary"]
        text = (f"E={r['num_experts']}: resident/streaming peak RSS {s['peak_rss_ratio']:.2f}x, above baseline "
                f"{s['peak_rss_above_baseline_ratio']:.2f}x (steady {s['steady_rss_above_baseline_ratio']:.2f}x), "
                f"weights {s['weight_bytes_ratio']:.2f}x")
        for stat in ("median", "min"):
            if f"latency_{stat}" in s:
                lat = s[f"latency_{stat}"]
                text += (f"\n  latency ({stat}s): streaming x{lat['streaming/resident']:.2f} of resident, "
                         f"x{lat['streaming/resident_per_expert']:.2f} of resident with per-expert dispatch; "
                         f"without prefetch x{lat['no_prefetch/resident']:.2f} of resident; resident batched / "
                         f"per-expert dispatch x{lat['resident_batched/resident_per_expert']:.2f}")
        if "cuda_max_allocated_ratio" in s:
            text += f"; CUDA max allocated {s['cuda_max_allocated_ratio']:.2f}x"
        lines.append(text)
        cli = r.get("cli_infer")
        if cli:
            lines.append(f"  m3vit infer (fresh processes): peak RSS {r['num_experts']} experts streaming "
                         f"{cli['runs']['streaming']['peak_rss'] / MIB:.0f} MiB vs {cli['dense_model']} resident "
                         f"{cli['runs']['dense resident']['peak_rss'] / MIB:.0f} MiB = "
                         f"{cli['streaming_over_dense_peak_rss']:.2f}x (target <= {cli['target_peak_rss_ratio']:.2f}x); "
                         f"resident {cli['runs']['resident']['peak_rss'] / MIB:.0f} MiB = "
                         f"{cli['resident_over_dense_peak_rss']:.2f}x")
    return "\n".join(lines)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_resources(args, workdir: Path) -> None:
    """Stop before writing anything large when the checkpoint will not fit on disk or the resident
    latency process (three resident copies plus two streaming models) not in memory."""
    import m3vit

    cfg = m3vit.models.model_config(args.model, {TASK: CLASSES}, tuple(args.img_size), num_experts=max(args.experts))
    weights = 4 * _config_params(cfg)
    need_disk = args.min_free_gib * 2**30 if args.min_free_gib else 1.2 * weights
    need_mem = args.min_free_gib * 2**30 if args.min_free_gib else 4.0 * weights
    free_disk = shutil.disk_usage(workdir).free
    free_mem = _available_memory_bytes()
    print(f"  largest checkpoint ~{weights / 2**30:.1f} GiB; free disk {free_disk / 2**30:.1f} GiB, "
          f"available memory {free_mem / 2**30 if free_mem else float('nan'):.1f} GiB", flush=True)
    if free_disk < need_disk:
        raise SystemExit(f"error: {workdir} has {free_disk / 2**30:.1f} GiB free, need ~{need_disk / 2**30:.1f} GiB; "
                         f"use --workdir elsewhere or fewer --experts")
    if free_mem is not None and free_mem < need_mem:
        raise SystemExit(f"error: {free_mem / 2**30:.1f} GiB of memory available, need ~{need_mem / 2**30:.1f} GiB "
                         f"for the latency process; use fewer --experts or --repeats 0")


def _config_params(cfg) -> int:
    """Backbone weight count from the config (attention, MLPs, experts; norms and heads left out)."""
    d, moe = cfg.embed_dim, len(cfg.moe_blocks)
    attention = cfg.depth * 4 * d * d
    dense = (cfg.depth - moe) * 2 * d * cfg.mlp_hidden
    experts = moe * cfg.num_experts * 2 * d * cfg.expert_hidden
    return attention + dense + experts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default="m3vit_base")
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--img-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (0: memory only)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cli-experts", type=int, nargs="*", default=[64], metavar="E",
                    help="expert counts for which `m3vit infer --stream-experts` is also compared with "
                         "`m3vit infer` on --dense-model (default 64; none: skip)")
    ap.add_argument("--dense-model", default="mvit_base", help="the dense model of the same active compute")
    ap.add_argument("--min-free-gib", type=float, default=None,
                    help="refuse to start with less free disk (workdir) or available memory than this "
                         "(default: estimated from the largest checkpoint)")
    ap.add_argument("--workdir", help="where the temporary checkpoints go (default: a temp folder)")
    ap.add_argument("--out", default="benchmarks/results/streaming_memory.json")
    # internal: one measurement in a fresh process
    ap.add_argument("--child", choices=["make", "measure", "latency"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--num-experts", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = {"make": child_make_checkpoint, "measure": child_measure, "latency": child_latency}[args.child](args)
        print(json.dumps(result))
        return 0

    import torch

    from m3vit.utils.io import write_json

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "device": args.device}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(f"# expert streaming: {args.model}, {args.img_size[0]}x{args.img_size[1]}, batch 1, task {TASK}, "
          f"experts {args.experts}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="m3vit-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        check_resources(args, workdir)
        results = [bench_experts(args, e, workdir) for e in args.experts]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"machine": info, "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
              "args": {k: v for k, v in vars(args).items() if k not in ("child", "mode", "checkpoint", "num_experts")},
              "results": results, "notes": NOTES, "elapsed_s": time.perf_counter() - start}
    write_json(args.out, report)
    print()
    print(table(results))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\nwrote {args.out} ({report['elapsed_s']:.0f} s)")
    return 0


NOTES = [
    "Each row is a fresh subprocess; peak RSS is its ru_maxrss (loading included), 'above baseline' subtracts "
    "the baseline process (torch + m3vit imported, input made), 'RSS after fwd' is VmRSS after the last forward.",
    "weights MiB: parameters + buffers in memory (streaming: the non-expert ones plus the two expert buffers).",
    "Expert reads hit the page cache (the checkpoint was just written); a cold disk adds read time to streaming.",
    "load_checkpoint builds the model on the meta device and reads each tensor once, so a peak is the weights "
    "plus the forward's activations; the steady ratio (RSS after the forward) is the one a long-running "
    "process sees.",
]


if __name__ == "__main__":
    sys.exit(main())
