"""``m3vit eval``: evaluate a checkpoint (or its ONNX export), each task through its own sparse pathway; Δm
against single-task baselines; optionally the fixed-point emulation of the accelerator's number formats.
The metrics table is ``m3vit.engine.evaluator.metrics_table``, the fixed-point one
``m3vit.efficiency.fixed_point.fixed_point_text``."""

from __future__ import annotations

import json
import sys

from .choices import EVAL_PATHWAYS, EVAL_PROTOCOLS, OVERFLOWS, ROUNDINGS
from ..utils.io import check_report_replaceable, write_report
from .common import CLIError, add_device_option, device, positive_int

#: The ``"format"`` of the JSON report ``--out`` writes (an existing file is replaced only when it has it).
EVAL_REPORT_FORMAT = "m3vit-eval-report"
_FIXED_POINT_OPTIONS = ("weight_bits", "weight_int_bits", "bias_bits", "bias_int_bits", "act_bits", "act_int_bits",
                        "rounding", "overflow")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint, each task through its own sparse pathway")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/final)")
    p.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: every task of the model)")
    p.add_argument("--split", help="dataset split (default: the run's data.val_split)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="run config override, e.g. --set data.seed=3 --set data.val_length=8")
    p.add_argument("--limit", type=positive_int, help="score only the first N samples")
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int,
                   help="default: the run's eval.batch_size")
    p.add_argument("--pathway", choices=EVAL_PATHWAYS, default="single",
                   help="single: each task alone (as deployed); all: every task in one batched forward")
    p.add_argument("--baselines", help="single-task metrics for Δm: a JSON file (an eval --out report) or a study "
                   "--out folder (its baselines.json) (default: eval.baselines; "
                   "with --protocol reference the paper's baselines of the dataset)")
    p.add_argument("--protocol", choices=EVAL_PROTOCOLS, default="default",
                   help="default: float predictions upsampled bilinearly to each label; reference: the official "
                   "M³ViT evaluation (class maps resized nearest, saliency and normals scored from 8-bit maps, Δm "
                   "against the paper's baselines without edge); see docs/reference.md")
    add_device_option(p)
    p.add_argument("--onnx", metavar="FILE",
                   help="evaluate this ONNX file (model.onnx or model.int8.onnx of 'm3vit export --onnx') with "
                        "onnxruntime instead of the checkpoint's PyTorch model, on the checkpoint's run data")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", help="also write the JSON results to this file")
    fx = p.add_argument_group("fixed point", "emulate the accelerator's number formats ap_fixed<BITS,INT_BITS> "
                              "(integer bits include the sign) and report the metric change per task")
    fx.add_argument("--fixed-point", action="store_true",
                    help="also evaluate the model with fixed-point weights and activations")
    fx.add_argument("--weight-bits", type=int, metavar="N", help="bits of a weight matrix value (default 16)")
    fx.add_argument("--weight-int-bits", type=int, metavar="N",
                    help="integer bits of a weight, sign included (default 2)")
    fx.add_argument("--bias-bits", type=int, metavar="N",
                    help="bits of biases, embeddings and norm parameters (default 16)")
    fx.add_argument("--bias-int-bits", type=int, metavar="N", help="their integer bits, sign included (default 5)")
    fx.add_argument("--act-bits", type=int, metavar="N", help="bits of every activation (default 32)")
    fx.add_argument("--act-int-bits", type=int, metavar="N",
                    help="integer bits of an activation, sign included (default 10)")
    fx.add_argument("--rounding", choices=ROUNDINGS,
                    help="nearest: ties to even (default); floor: truncate towards -inf (HLS ap_fixed default)")
    fx.add_argument("--overflow", choices=OVERFLOWS,
                    help="saturate: clip to the range (default); wrap: two's complement (HLS ap_fixed default)")
    p.set_defaults(func=run)


def _fixed_point_formats(args) -> dict | None:
    """The ``--fixed-point`` formats (weight, bias, activation), or None without the flag; bad bits: CLIError."""
    from ..efficiency.fixed_point import DEFAULT_ACTIVATION, DEFAULT_BIAS, DEFAULT_WEIGHT, FixedPoint

    given = [f"--{o.replace('_', '-')}" for o in _FIXED_POINT_OPTIONS if getattr(args, o) is not None]
    if not args.fixed_point:
        if given:
            raise CLIError(f"{given[0]} sets a fixed-point format; add --fixed-point to evaluate in fixed point")
        return None
    modes = {"rounding": args.rounding or "nearest", "overflow": args.overflow or "saturate"}
    formats = {}
    for kind, default, flag in (("weight", DEFAULT_WEIGHT, "weight"), ("bias", DEFAULT_BIAS, "bias"),
                                ("activation", DEFAULT_ACTIVATION, "act")):
        total = getattr(args, f"{flag}_bits")
        integer = getattr(args, f"{flag}_int_bits")
        total = default.total_bits if total is None else total
        integer = default.integer_bits if integer is None else integer
        try:
            formats[kind] = FixedPoint(total, integer, **modes)
        except ValueError as exc:
            raise CLIError(f"--{flag}-bits {total} --{flag}-int-bits {integer}: {exc}") from None
    return formats


def _fixed_point_eval(model, formats: dict, float_metrics: dict, run_eval) -> dict:
    """Evaluate the fixed-point emulation of ``model``; the JSON block of ``eval --fixed-point``."""
    from ..efficiency.fixed_point import metric_delta, quantize_model

    fixed = quantize_model(model, formats["weight"], formats["activation"], bias_format=formats["bias"])
    metrics = run_eval(fixed)
    summary = fixed.summary()
    return {"formats": summary.pop("formats"), "metrics": metrics, "delta": metric_delta(float_metrics, metrics),
            "saturation": summary}


def run(args) -> int:
    from ..engine.builders import build_eval_dataset
    from ..engine.checkpoints import checkpoint_step, load_run
    from ..engine.evaluator import evaluate, metrics_table
    from ..tasks import delta_m, load_baselines, reference_baselines_path, reference_delta_m
    from ..tasks.delta import REFERENCE_DELTA_M_EXCLUDES

    if args.out:  # refused at once, not after the evaluation
        check_report_replaceable(args.out, EVAL_REPORT_FORMAT)
    formats = _fixed_point_formats(args)
    if args.onnx and formats is not None:
        raise CLIError("--fixed-point emulates the PyTorch model: it cannot be combined with --onnx")
    model, cfg = load_run(args.checkpoint, args.set or [], map_location=device(args.device))
    if args.onnx:  # the ONNX file's predictions, scored on the checkpoint's run data
        from ..efficiency.onnx_export import OnnxError
        from ..efficiency.onnx_model import OnnxModel

        try:
            model = OnnxModel(args.onnx)
        except OnnxError as exc:
            raise CLIError(str(exc)) from None
    tasks = model.resolve_tasks(args.tasks)
    reference = args.protocol == "reference"
    baselines_path = args.baselines or cfg.eval.baselines
    if reference and not baselines_path:  # the paper's baselines of the dataset, shipped with m3vit
        baselines_path = reference_baselines_path(cfg.data.name)
    baselines = load_baselines(baselines_path) if baselines_path else None
    dm_tasks = [t for t in tasks if not (reference and t in REFERENCE_DELTA_M_EXCLUDES)]
    if baselines is not None and dm_tasks:
        missing = [t for t in dm_tasks if t not in baselines]
        if missing:
            raise CLIError(f"baselines {baselines_path} have no entry for task(s) {missing}; they cover "
                           f"{sorted(baselines)} (choose tasks with --tasks)")
    split = args.split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, split=split)
    batch_size = cfg.eval.batch_size if args.eval_batch_size is None else args.eval_batch_size

    def run_eval(net):
        return evaluate(net, dataset, tasks, batch_size=batch_size, eval_cfg=cfg.eval, pathway=args.pathway,
                        limit=args.limit, progress=not args.json and sys.stderr.isatty(), protocol=args.protocol)

    metrics = run_eval(model)
    dm = None
    if baselines is not None and dm_tasks:
        dm = reference_delta_m(metrics, baselines)[0] if reference else delta_m(metrics, baselines)
    num_samples = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    report = {
        "format": EVAL_REPORT_FORMAT,
        "metrics": metrics,
        "checkpoint": str(args.checkpoint),
        "onnx": args.onnx,
        "step": checkpoint_step(args.checkpoint),
        "data": {**cfg.to_dict()["data"], "split": split, "num_samples": num_samples},
        "pathway": args.pathway,
        "protocol": args.protocol,
        "delta_m": dm,
        "delta_m_tasks": dm_tasks if dm is not None else [],
        "baselines": str(baselines_path) if baselines_path else None,
    }
    if formats is not None:
        report["fixed_point"] = _fixed_point_eval(model, formats, metrics, run_eval)
    if args.out:
        write_report(args.out, report)  # refuses a file not its own; a write failure names the path
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    step = "" if report["step"] is None else f" (step {report['step']})"
    how = "each task through its own pathway" if args.pathway == "single" else "all tasks in one forward"
    protocol = (" (official protocol: class maps resized nearest, saliency and normals as 8-bit PNGs)"
                if reference else "")
    what = f"{args.onnx} (onnxruntime; data of {args.checkpoint})" if args.onnx else f"{args.checkpoint}{step}"
    print(f"{what} on {cfg.data.name} {split}, {num_samples} samples, {how}{protocol}:")
    print(metrics_table(metrics))
    if dm is not None:
        left_out = sorted(set(tasks) - set(dm_tasks))
        note = f"; {', '.join(left_out)} left out as officially" if left_out else ""
        print(f"Δm vs {baselines_path}: {dm:+.2f}% (mean relative gain of each task's main metric over "
              f"{', '.join(dm_tasks)}{note})")
    elif reference and baselines is None:
        print(f"Δm: the paper has no single-task baselines for {cfg.data.name}; give them with --baselines")
    if formats is not None:
        from ..efficiency.fixed_point import fixed_point_text

        print()
        print(fixed_point_text(report["fixed_point"]))
    if args.out:
        print(f"wrote {args.out}")
    return 0
