"""``m3vit export``: extract one task into a standalone checkpoint with only the experts it uses, optionally as
ONNX and int8 ONNX (the report text is ``m3vit.efficiency.export.ExtractionReport.to_text``)."""

from __future__ import annotations

import json

from .choices import GATE_SOFTMAX, INT8_METHODS
from .common import CLIError, add_device_option, device, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="extract one task into a standalone checkpoint with only the experts "
                                             "it uses")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/final)")
    p.add_argument("--task", required=True, help="the task to extract")
    p.add_argument("--out", required=True, help="output checkpoint directory (replaced atomically)")
    p.add_argument("--calibration", type=positive_int, default=64, metavar="N",
                   help="calibration images: the first N of the run's validation split (default 64)")
    p.add_argument("--min-usage", type=float, default=0.0, metavar="F",
                   help="keep experts taking more than this share of the task's assignments (default 0: every "
                        "expert the task used; predictions on the calibration images are unchanged)")
    p.add_argument("--gate-softmax", choices=GATE_SOFTMAX, default="all",
                   help="all: softmax over every expert's gate logit, weights unchanged (exact); kept: only the "
                        "kept experts' gate rows, routing renormalised over them")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (checked against PyTorch with onnxruntime when installed)")
    p.add_argument("--int8", nargs="?", const="static", choices=INT8_METHODS, metavar="METHOD",
                   help="also write model.int8.onnx with onnxruntime's quantiser: static (the default: convolutions "
                        "and linear layers int8, activation ranges calibrated on the calibration images) or dynamic "
                        "(linear layers only, no calibration: more accurate, less fast)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override, e.g. --set data.seed=3")
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int,
                   help="default: the run's eval.batch_size")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print the report (export.json) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..efficiency.export import INT8_FILE, ONNX_FILE, export_checkpoint
    from ..efficiency.onnx_export import OnnxError

    if not 0 <= args.min_usage < 1:
        raise CLIError(f"--min-usage must be in [0, 1) (a share of the task's expert assignments), got "
                       f"{args.min_usage}")
    if args.int8 is not None and not args.onnx:
        raise CLIError("--int8 quantises the ONNX file: add --onnx")
    try:
        report = export_checkpoint(args.checkpoint, args.task, args.out, calibration=args.calibration,
                                   min_usage=args.min_usage, gate_softmax=args.gate_softmax, onnx=args.onnx,
                                   int8=args.int8, batch_size=args.eval_batch_size,
                                   device=device(args.device), overrides=args.set or [])
    except OnnxError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{args.checkpoint} -> {args.out}: {report.to_text()}")
    files = (["model.safetensors", "config.yaml", "export.json"] + [ONNX_FILE] * args.onnx
             + [INT8_FILE] * (args.int8 is not None))
    print(f"wrote {args.out} ({', '.join(files)})")
    return 0
