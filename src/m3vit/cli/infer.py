"""``m3vit infer``: predict tasks for image files and write coloured PNGs (and raw ``.npy``)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import CLIError, add_device_option, device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("infer", help="predict tasks for image files; write coloured PNGs (and raw .npy)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--task", action="append", required=True, help="a task to predict (repeat for more)")
    p.add_argument("--out", required=True, help="output folder for <image stem>_<task>.png")
    p.add_argument("--npy", action="store_true",
                   help="also write <stem>_<task>.npy: class ids (uint8), probabilities (sal, edge), unit "
                        "normals [3,H,W] or depth, at the image's size")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default: the model's img_size; multiples of the patch size, "
                        "each side at most 4096)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse images with more than N pixels, from their header, before decoding (default "
                        "m3vit.data.images.MAX_PIXELS: 50000000; 0: no limit but PIL's own)")
    add_device_option(p)
    p.add_argument("--stream-experts", action="store_true",
                   help="keep expert weights in the checkpoint file and read them two at a time per MoE layer "
                        "(less memory, same predictions; see m3vit.efficiency.streaming)")
    p.add_argument("--compile", nargs="?", const="default", metavar="BACKEND", type=_backend_name,
                   help="run the model under torch.compile (m3vit.nn.compile_model; the first image compiles): "
                        "BACKEND is torch.compile's (default: inductor, or aot_eager on a CPU without a C++ "
                        "compiler); not with --stream-experts")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size; PNG, JPEG, ...)")
    p.set_defaults(func=run)


def _backend_name(value: str) -> str:
    """``--compile``'s optional BACKEND: a torch.compile backend name, never a file (``--compile photo.jpg``
    would otherwise take the image for the backend)."""
    if "." in value or "/" in value or os.sep in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch.compile backend: give images before --compile "
                                         f"or write --compile=BACKEND")
    return value


def run(args) -> int:
    from ..engine.inference import MAX_PIXELS, infer_files
    from ..models import load_checkpoint

    if args.max_pixels is not None and args.max_pixels < 0:
        raise CLIError(f"--max-pixels must be >= 1 (or 0 for no limit but PIL's own), got {args.max_pixels}")
    max_pixels = MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    if args.stream_experts:
        from ..efficiency import load_streaming_model

        model = load_streaming_model(args.checkpoint, map_location=device(args.device))
    else:
        model = load_checkpoint(args.checkpoint, map_location=device(args.device))
    if args.compile is not None:
        from ..nn import compile_model

        model = compile_model(model, backend=None if args.compile == "default" else args.compile)
    result = infer_files(model, args.images, args.task, args.out, size=args.size, save_npy=args.npy,
                         max_pixels=max_pixels)
    for _, reason in result.failed:
        print(f"error: {reason}", file=sys.stderr)
    print(f"wrote {len(result.written)} files for {len(result.processed)} image(s) x {len(result.tasks)} task(s) "
          f"({', '.join(result.tasks)}) to {args.out}"
          + (f"; {len(result.failed)} image(s) could not be read" if result.failed else ""))
    return 1 if result.failed else 0
