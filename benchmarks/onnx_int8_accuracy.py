"""int8 ONNX accuracy on a trained checkpoint: per task, PyTorch against the float ONNX export, its int8
versions and the fixed-point emulation, all scored by the same evaluator.

What it measures
----------------
For each task of ``--checkpoint`` (default ``demo-out/m3vit/final``, the demo's M³ViT):

* ``pytorch``      the task extracted at min-usage 0 (every expert it uses: exact), ``m3vit export``;
* ``onnx fp32``    its ``model.onnx`` in onnxruntime (``m3vit.efficiency.onnx_model.evaluate_onnx``);
* ``int8 <m>``     ``model.onnx`` quantised by ``quantize_onnx(method=m)`` (``--methods``, default all);
                   static ranges are calibrated on the first ``--calib-images`` images of the run's *train*
                   split, so the images scored are not the ones calibrated on (``m3vit export --int8``
                   calibrates on its calibration images, the validation split's first N);
* ``fixed point``  ``m3vit.efficiency.fixed_point.quantize_model`` of the extracted model with the default
                   formats (weights ap_fixed<16,2>, activations ap_fixed<32,10>): the accelerator's emulation.

Each is scored with ``engine.evaluator.evaluate`` on the run's validation split (``--limit`` images).
The target (the efficiency issue): every task's int8 metrics within 1 point of the float model's
(metrics are in percent, normals in degrees). Writes JSON (``--out``, default
``benchmarks/results/onnx_int8_accuracy.json``) and prints a Markdown table of each task's headline
metric and the largest change of any of its metrics.

Run: ``.venv/bin/python benchmarks/onnx_int8_accuracy.py [--checkpoint demo-out/m3vit/final]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _env import loadavg, machine_info

from m3vit.utils.io import write_json
from m3vit.efficiency.export import export_checkpoint
from m3vit.efficiency.fixed_point import metric_delta, quantize_model
from m3vit.efficiency.onnx_export import QUANTIZATION_METHODS, quantize_onnx
from m3vit.efficiency.onnx_model import evaluate_onnx
from m3vit.engine.builders import build_eval_dataset
from m3vit.engine.checkpoints import load_run
from m3vit.data import preprocess
from m3vit.engine.evaluator import evaluate
from m3vit.models import load_checkpoint
from m3vit.tasks.registry import task_class

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "onnx_int8_accuracy.json"


def score_task(checkpoint: Path, task: str, run_cfg, val, calibration: torch.Tensor, methods: list[str],
               limit: int | None, workdir: Path) -> dict:
    out = workdir / task
    started = time.perf_counter()
    report = export_checkpoint(checkpoint, task, out, calibration=limit, onnx=True, device="cpu")
    options = dict(batch_size=run_cfg.eval.batch_size, eval_cfg=run_cfg.eval, limit=limit)
    extracted = load_checkpoint(out)
    metrics = {"pytorch": evaluate(extracted, val, [task], **options)[task],
               "onnx fp32": evaluate_onnx(out / "model.onnx", val, **options)[task]}
    files = {"onnx fp32": (out / "model.onnx").stat().st_size}
    for method in methods:
        path = quantize_onnx(out / "model.onnx", out / f"model.int8.{method}.onnx", method=method,
                             calibration=calibration, batch_size=run_cfg.eval.batch_size)
        metrics[f"int8 {method}"] = evaluate_onnx(path, val, **options)[task]
        files[f"int8 {method}"] = path.stat().st_size
    metrics["fixed point"] = evaluate(quantize_model(extracted), val, [task], **options)[task]
    change = {name: metric_delta({task: metrics["onnx fp32"]}, {task: m})[task] for name, m in metrics.items()}
    return {"metrics": metrics, "change_vs_onnx_fp32": change, "file_bytes": files,
            "onnx_max_abs_diff_vs_pytorch": report.onnx["max_abs_diff"], "seconds": time.perf_counter() - started}


def markdown(results: dict) -> str:
    variants = list(next(iter(results.values()))["metrics"])
    lines = ["| task | metric | " + " | ".join(variants) + " | largest int8 change (any metric) |",
             "|---|---|" + "---:|" * (len(variants) + 1)]
    for task, res in results.items():
        cls = task_class(task)
        metric = cls.primary_metric
        arrow = "↑" if cls.metric_higher_is_better(metric) else "↓"
        int8_changes = [abs(v) for name, c in res["change_vs_onnx_fp32"].items() if name.startswith("int8")
                        for v in c.values()]
        cells = []
        for name in variants:
            value, delta = res["metrics"][name][metric], res["change_vs_onnx_fp32"][name][metric]
            cells.append(f"{value:.2f}" if name in ("pytorch", "onnx fp32") else f"{value:.2f} ({delta:+.2f})")
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + f" | {max(int8_changes, default=0):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--checkpoint", default="demo-out/m3vit/final", help="a trained checkpoint directory")
    ap.add_argument("--tasks", nargs="+", help="tasks to score (default: every task of the checkpoint)")
    ap.add_argument("--methods", nargs="+", default=list(QUANTIZATION_METHODS), choices=QUANTIZATION_METHODS)
    ap.add_argument("--calib-images", type=int, default=48, help="train-split images the static ranges are measured on")
    ap.add_argument("--limit", type=int, help="score the first N validation images (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    model, run_cfg = load_run(checkpoint, [], map_location="cpu")
    tasks = model.resolve_tasks(args.tasks)
    val = build_eval_dataset(run_cfg, split=run_cfg.data.val_split)
    train = build_eval_dataset(run_cfg, split=run_cfg.data.train_split)
    count = min(args.calib_images, len(train))
    calibration = preprocess([train[i]["image"] for i in range(count)], model.config.img_size)
    load_before = loadavg()
    print(f"loadavg before: {load_before}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnx_int8_") as tmp:
        for task in tasks:
            print(f"{task} ...", file=sys.stderr, flush=True)
            results[task] = score_task(checkpoint, task, run_cfg, val, calibration, args.methods, args.limit, Path(tmp))
    import onnxruntime

    report = {
        "benchmark": "onnx_int8_accuracy",
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "checkpoint": str(checkpoint), "model": model.config.name, "img_size": list(model.config.img_size),
        "data": {"name": run_cfg.data.name, "split": run_cfg.data.val_split,
                 "images": len(val) if args.limit is None else min(args.limit, len(val)),
                 "calibration": {"split": run_cfg.data.train_split, "images": count}},
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "machine": {**machine_info(), "onnxruntime": onnxruntime.__version__},
        "results": results,
    }
    write_json(args.out, report)
    print(markdown(results))
    print(f"\nloadavg after: {report['loadavg_after']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
