"""ONNX deployment latency on CPU: onnxruntime against PyTorch eager, the sparse MoE export against the
dense M-ViT, fp32 against int8.

What it measures
----------------
For each size (default ``tiny`` at 224x224 and ``small`` at 512x512) one-task models (task ``semseg``,
21 channels, random weights, seed 0) of M³ViT (``m3vit_<size>``: 16 experts, top-4, MoE in every
other block) and of the dense M-ViT (``mvit_<size>``, the same active compute per token) are exported
with ``m3vit.efficiency.onnx_export.export_onnx`` and run side by side in one process:

* ``ort m3vit``         onnxruntime, the MoE layers in the sparse export form (each expert runs only on
                        the tokens routed to it);
* ``ort mvit``          onnxruntime, the dense model;
* ``ort ... int8 <m>``  the same files quantised by ``quantize_onnx`` (``--int8``: ``static``, ``dynamic``;
                        static calibrates on random images, which is fine for latency only); with
                        ``--float-experts`` also m3vit static with its experts' GEMMs left in float;
* ``torch m3vit`` / ``torch mvit``  PyTorch eager ``model(images, tasks=["semseg"])`` under inference mode.

Batch 1, ``--threads`` (default 2) intra-op threads for both runtimes (``intra_op_num_threads``,
``torch.set_num_threads``). onnxruntime's idle worker threads do not spin between runs (``--spin``
restores onnxruntime's default): with six sessions and two PyTorch models in one process, spinning
threads of the session that just ran take the cores from the variant timed next (tiny 224², measured:
torch m3vit 271 vs 171 ms, ort mvit 192 vs 147 ms). After ``--warmup`` rounds, ``--repeats`` rounds each time every variant once,
in an order rotated every round; medians are reported. The routing of random weights is close to
uniform over the experts; a trained model's routing is more skewed.

Targets (the efficiency issue): ``ort m3vit / ort mvit <= 1.10`` at both sizes, ``ort m3vit <= torch
m3vit``, ``ort m3vit / ort m3vit int8 >= 1.5`` at small 512².

Writes JSON (``--out``, default ``benchmarks/results/onnx_latency.json``) and prints a Markdown table,
with ``/proc/loadavg`` before and after.

Run: ``.venv/bin/python benchmarks/onnx_latency.py [--sizes tiny:224 small:512] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _env import loadavg, machine_info

import m3vit
from m3vit.utils.io import write_json
from m3vit.efficiency.onnx_export import QUANTIZATION_METHODS, export_onnx, onnx_session, quantize_onnx

TASK = "semseg"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "onnx_latency.json"


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return m3vit.create_model(name, [TASK], img_size=(size, size)).eval()


def prepare(label: str, size: int, int8: list[str], threads: int, workdir: Path, spin: bool = True,
            float_experts: bool = False) -> dict:
    """Models, ONNX files and sessions of one size: ``{variant: callable(images) -> output}``."""
    models = {"m3vit": build(f"m3vit_{label}", size), "mvit": build(f"mvit_{label}", size)}
    calibration = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    runners, files = {}, {}
    for name, model in models.items():
        path = export_onnx(model, workdir / f"{label}_{name}.onnx")
        files[f"ort {name}"] = path
        for method in int8:
            files[f"ort {name} int8 {method}"] = quantize_onnx(path, workdir / f"{label}_{name}.int8_{method}.onnx",
                                                              method=method, calibration=calibration, batch_size=1)
        if float_experts and name == "m3vit" and "static" in int8:
            files[f"ort {name} int8 static, experts float"] = quantize_onnx(
                path, workdir / f"{label}_{name}.int8_static_float_experts.onnx", method="static",
                calibration=calibration, batch_size=1, float_experts=True)
    for variant, path in files.items():
        session = onnx_session(path, threads=threads, spin=spin)
        input_name = session.get_inputs()[0].name
        runners[variant] = (lambda s, n: lambda x: s.run(None, {n: x.numpy()}))(session, input_name)
    for name, model in models.items():
        runners[f"torch {name}"] = (lambda m: lambda x: m(x, tasks=[TASK]))(model)
    sizes = {variant: path.stat().st_size for variant, path in files.items()}
    return {"runners": runners, "file_bytes": sizes}


def time_variants(runners: dict, size: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    names = list(runners)
    runs: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                runners[n](images)
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                start = time.perf_counter()
                runners[n](images)
                runs[n].append((time.perf_counter() - start) * 1e3)
    return runs


def ratios(medians: dict[str, float], int8: list[str]) -> dict[str, float]:
    out = {}

    def put(key, a, b):
        if a in medians and b in medians:
            out[key] = medians[a] / medians[b]

    put("ort m3vit / ort mvit (target <= 1.10)", "ort m3vit", "ort mvit")
    put("ort m3vit / torch m3vit (target <= 1)", "ort m3vit", "torch m3vit")
    put("ort mvit / torch mvit", "ort mvit", "torch mvit")
    put("torch m3vit / torch mvit", "torch m3vit", "torch mvit")
    for method in int8:
        put(f"int8 {method} speed-up m3vit: fp32 / int8 (target >= 1.5 at small 512)", "ort m3vit",
            f"ort m3vit int8 {method}")
        put(f"int8 {method} speed-up mvit: fp32 / int8", "ort mvit", f"ort mvit int8 {method}")
        put(f"ort m3vit int8 {method} / ort mvit int8 {method}", f"ort m3vit int8 {method}", f"ort mvit int8 {method}")
    put("int8 static speed-up m3vit, experts float: fp32 / int8", "ort m3vit", "ort m3vit int8 static, experts float")
    return out


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines.append(f"\n{res['size']} ({res['img_size']}², batch 1, {res['threads']} threads, "
                     f"{res['repeats']} interleaved repeats, median ms)\n")
        lines.append("| variant | median ms | min ms | file MB |")
        lines.append("|---|---:|---:|---:|")
        for name, row in res["variants"].items():
            size = res["file_bytes"].get(name)
            lines.append(f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
                         f"{'' if size is None else f'{size / 1e6:.1f}'} |")
        lines.append("\n| ratio | value |")
        lines.append("|---|---:|")
        for key, value in res["ratios"].items():
            lines.append(f"| {key} | {value:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny:224", "small:512"], metavar="NAME:PIXELS",
                    help="model size and square input size, e.g. tiny:224 small:512")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", nargs="*", default=list(QUANTIZATION_METHODS), choices=QUANTIZATION_METHODS,
                    help="int8 methods to time (default: all)")
    ap.add_argument("--spin", action="store_true",
                    help="let onnxruntime's idle worker threads spin between runs (its default; here they take the "
                         "cores from the session or PyTorch call timed next, so it is off unless asked for)")
    ap.add_argument("--float-experts", action="store_true",
                    help="also time m3vit quantised static with its experts' GEMMs left in float")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    print(f"loadavg before: {load_before}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnx_latency_") as tmp:
        for spec in args.sizes:
            label, _, pixels = spec.partition(":")
            size = int(pixels or 224)
            print(f"exporting {label} at {size}x{size} ...", file=sys.stderr, flush=True)
            setup = prepare(label, size, args.int8, args.threads, Path(tmp), spin=args.spin,
                            float_experts=args.float_experts)
            print(f"timing {len(setup['runners'])} variants ...", file=sys.stderr, flush=True)
            runs = time_variants(setup["runners"], size, args.repeats, args.warmup)
            medians = {n: statistics.median(r) for n, r in runs.items()}
            results.append({
                "size": label, "img_size": size, "threads": args.threads, "repeats": args.repeats,
                "ort_spinning": args.spin,
                "variants": {n: {"median_ms": medians[n], "min_ms": min(r), "runs_ms": r} for n, r in runs.items()},
                "file_bytes": setup["file_bytes"],
                "ratios": ratios(medians, args.int8),
            })
            del setup
    load_after = loadavg()
    import onnxruntime

    report = {
        "benchmark": "onnx_latency",
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "machine": {**machine_info(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "task": TASK, "batch": 1, "results": results,
    }
    write_json(args.out, report)
    print(markdown(results))
    print(f"\nloadavg after: {load_after}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
