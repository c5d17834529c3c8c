"""Command-line interface: ``m3vit models | flops | demo | data``. Errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

PASCAL_TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]
log = logging.getLogger("m3vit")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CLIError(f"--set {key}: cannot parse value {value!r} as YAML") from None
    return out


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [list(headers)] + [[c if isinstance(c, str) else _num(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _flops_table(report) -> str:
    from .efficiency import COMPONENTS

    headers = ["tasks", "GMACs", "GFLOPs"] + list(COMPONENTS)
    rows = [[t, r["gmacs"], r["gflops"]] + [r["by_component"][c] for c in COMPONENTS] for t, r in report.by_task.items()]
    if len(report.tasks) > 1:
        rows.append([f"all {len(report.tasks)}", report.gmacs, report.gflops]
                    + [report.by_component[c] for c in COMPONENTS])
    return _table(headers, rows)


def _build_model(args):
    import m3vit

    if getattr(args, "checkpoint", None):
        return m3vit.load_checkpoint(args.checkpoint)
    return m3vit.create_model(args.model, args.tasks or PASCAL_TASKS, img_size=tuple(args.img_size),
                              **_parse_overrides(args.set))


def cmd_models(args) -> int:
    from .models import describe_models

    for name, text in describe_models().items():
        print(f"{name:14s} {text}")
    return 0


def cmd_flops(args) -> int:
    import m3vit

    model = _build_model(args)
    tasks = args.tasks if args.checkpoint else None
    report = m3vit.count_flops(model, tuple(args.img_size), tasks=tasks, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    h, w = report.img_size
    print(f"{report.model}: {report.params_m:.1f} M parameters ({report.backbone_params_m:.1f} M in the backbone)")
    print(f"{report.model} at {h}x{w}, batch {report.batch_size} (component columns in GFLOPs; "
          f"FLOPs = 2 x MACs; attention includes {report.attention_matmul_gflops:.2f} GFLOPs of QK^T/AV matmuls)")
    print(_flops_table(report))
    return 0


def cmd_demo(args) -> int:
    import torch

    import m3vit

    from .efficiency import measure_latency

    torch.manual_seed(0)
    size = tuple(args.img_size)
    results = {}
    print(f"m3vit demo: M³ViT vs dense M-ViT for {len(args.tasks)} tasks at {size[0]}x{size[1]} "
          f"on {torch.get_num_threads()} CPU thread(s), batch 1\n")
    for name in args.models:
        model = m3vit.create_model(name, args.tasks, img_size=size).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        report = m3vit.count_flops(model, size)
        settings = [[t] for t in model.tasks] + [None]
        latency = measure_latency(model, size, settings, repeats=args.repeats, warmup=1)
        lat = {("all" if s is None else s[0]): r["median_ms"] for s, r in zip(settings, latency)}
        results[name] = {"params_m": params, "flops": report.to_dict(), "latency_ms": lat}
        print(f"== {name} ({params:.1f} M parameters)")
        print(_flops_table(report))
        print("latency (median of %d, ms): " % args.repeats
              + ", ".join(f"{k} {v:.0f}" for k, v in lat.items()))
        single = sum(lat[t] for t in model.tasks)
        print(f"  one task alone: {min(lat[t] for t in model.tasks):.0f}-{max(lat[t] for t in model.tasks):.0f} ms; "
              f"all {len(model.tasks)} tasks in one pass: {lat['all']:.0f} ms "
              f"(vs {single:.0f} ms as {len(model.tasks)} single-task runs)\n")
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        cfg = m3vit.models.model_config(a, args.tasks, img_size=size)
        ta, tb = ra["flops"]["by_task"], rb["flops"]["by_task"]
        rows = [[t, ta[t]["gmacs"], tb[t]["gmacs"], ra["latency_ms"][t], rb["latency_ms"][t]] for t in ta]
        rows.append(["all", ra["flops"]["gmacs"], rb["flops"]["gmacs"], ra["latency_ms"]["all"], rb["latency_ms"]["all"]])
        print(f"== per-task comparison: {a} vs {b}")
        print(_table(["task", f"{a} GMACs", f"{b} GMACs", f"{a} ms", f"{b} ms"], rows))
        print(f"\nEach task runs only its own pathway: its router, the top-{cfg.top_k} of {cfg.num_experts} "
              f"experts it picks (width {cfg.expert_hidden} each) and its head; a dense MLP has width "
              f"{cfg.mlp_hidden}. 'all' runs the task-dependent blocks once per task in one batched pass.")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


def cmd_data_show(args) -> int:
    from .data import build_dataset
    from .data.show import render_grid

    if args.num < 1 or args.start < 0:
        raise CLIError("--num must be >= 1 and --start >= 0")
    options = {"size": tuple(args.size)} if args.size else {}
    if args.dataset == "synthetic":
        options["length"] = args.start + args.num
    dataset = build_dataset(args.dataset, args.split, root=args.root, seed=args.seed, tasks=args.tasks, **options)
    stop = min(args.start + args.num, len(dataset))
    if args.start >= stop:
        raise CLIError(f"--start {args.start} is past the end of the {args.split} split ({len(dataset)} samples)")
    path = render_grid(dataset, list(range(args.start, stop)), args.out)
    print(f"wrote {path} ({stop - args.start} {args.dataset} {args.split} samples: image + "
          f"{', '.join(dataset.tasks)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m3vit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("flops", help="count the FLOPs that actually execute, per task and component")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="m3vit_small", help="registered model name (see 'm3vit models')")
    src.add_argument("--checkpoint", help="checkpoint directory instead of --model")
    p.add_argument("--tasks", nargs="+", help=f"task names (default: {' '.join(PASCAL_TASKS)})")
    p.add_argument("--img-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. --set num_experts=32 --set router=task_conditioned")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("demo", help="FLOPs and CPU latency of M³ViT vs M-ViT, single-task vs all-task")
    p.add_argument("--models", nargs=2, default=["m3vit_small", "mvit_small"], metavar=("MOE", "DENSE"))
    p.add_argument("--tasks", nargs="+", default=PASCAL_TASKS)
    p.add_argument("--img-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="look at a dataset")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data.add_parser("show", help="write a PNG grid of samples: the image and every label, coloured")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "pascal_context", "nyud"])
    p.add_argument("--root", help="dataset root (PASCAL_MT or NYUD_MT tree; not needed for synthetic)")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", nargs="+", help="labels to show (default: every task of the dataset)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="render size of the synthetic scenes (default 128 128); for real data: resize to this")
    p.add_argument("--num", type=int, default=4, help="number of samples (rows)")
    p.add_argument("--start", type=int, default=0, help="index of the first sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG to write")
    p.set_defaults(func=cmd_data_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "batch_size", 1) < 1 or getattr(args, "repeats", 1) < 1:
            raise CLIError("--batch-size and --repeats must be >= 1")
        return args.func(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("M3VIT_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
