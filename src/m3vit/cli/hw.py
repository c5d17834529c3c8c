"""``m3vit hw simulate | compare``: the model of the M³ViT FPGA accelerator, alone or beside latency measured
on this machine (report text: ``m3vit.hardware.report``)."""

from __future__ import annotations

import json

from .choices import HW_DESIGNS, packaged_platforms
from ..utils.io import check_report_replaceable, write_report
from .common import CLIError, Parser, default_model_tasks, positive_int

#: The ``"format"`` of the JSON report ``--out`` writes (an existing file is replaced only when it has it).
HW_REPORT_FORMAT = "m3vit-hw-report"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("hw", help="model of the M³ViT FPGA accelerator: simulate designs, compare with "
                                         "this machine")
    hw = p.add_subparsers(dest="hw_command", required=True, parser_class=Parser)
    for name, helptext, func in (
        ("simulate", "latency, DRAM traffic, on-chip memory and energy of the dense / token-by-token / "
                     "reordered / all-on-chip dataflows", run_simulate),
        ("compare", "the simulated FPGA designs beside measured latency on this machine's CPU (and GPU)",
         run_compare),
    ):
        p = hw.add_parser(name, help=helptext)
        p.add_argument("--platform", default="zcu104",
                       help=f"packaged platform ({', '.join(packaged_platforms())}) or a platform YAML")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", default="m3vit_small", help="registered model name (see 'm3vit models')")
        src.add_argument("--checkpoint", help="checkpoint directory instead of --model")
        p.add_argument("--tasks", nargs="+", help="tasks of --model (default: the five PASCAL-Context tasks)")
        p.add_argument("--task", help="the task whose pathway runs (default: the model's first task)")
        p.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                       help="input size (default 512 512, or the checkpoint's img_size)")
        p.add_argument("--experts", type=positive_int, help="override the number of experts per MoE layer")
        p.add_argument("--top-k", type=positive_int, help="override the experts per token")
        p.add_argument("--image", help="trace the routing of this image through --checkpoint (default: synthetic)")
        p.add_argument("--routing-alpha", type=float,
                       help="synthetic routing skew: expert popularity ~ Dirichlet(alpha) (default: uniform)")
        p.add_argument("--seed", type=int, default=0, help="seed of the synthetic routing")
        p.add_argument("--cache-experts", type=positive_int,
                       help="expert cache of the token-by-token design (default: top-k)")
        p.add_argument("--designs", nargs="+", choices=HW_DESIGNS)
        p.add_argument("--heads", action="store_true",
                       help="include the task's decoder (default: backbone only, as the paper's FPGA figures)")
        p.add_argument("--sweep-experts", nargs="+", type=positive_int, metavar="N",
                       help="also report on-chip memory and latency for these expert counts, e.g. 8 16 32 64")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--out", help="also write the JSON report to this file")
        if name == "compare":
            p.add_argument("--cpu-power", type=float, required=True, metavar="W",
                           help="power drawn by this machine's CPU while it runs the model (energy = W x latency)")
            p.add_argument("--gpu-power", type=float, metavar="W", help="power of the GPU, when one is present")
            p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per device (median reported)")
        p.set_defaults(func=func)


def _inputs(args, need_model: bool = False):
    """(model config, task, traced routing or None, model or None) of ``hw simulate`` / ``hw compare``."""
    from ..models import load_checkpoint, model_config
    from ..models.checkpoint import verify_checkpoint

    if args.out:  # refused at once, not after the simulation
        check_report_replaceable(args.out, HW_REPORT_FORMAT)
    overrides = {k: v for k, v in (("num_experts", args.experts), ("top_k", args.top_k)) if v is not None}
    size = tuple(args.img_size) if args.img_size else None
    if args.image and not args.checkpoint:
        raise CLIError("--image needs --checkpoint: the routing is traced through that model")
    if args.checkpoint:
        if args.tasks:
            raise CLIError("--tasks applies to --model; a checkpoint brings its own tasks (pick one with --task)")
        if args.image and overrides:
            raise CLIError("--experts/--top-k cannot change the routing traced from a checkpoint; drop --image "
                           "to simulate a changed config with synthetic routing")
        cfg = verify_checkpoint(args.checkpoint).config  # a damaged checkpoint is refused, even for its config
        cfg = cfg.replace(**overrides, **({"img_size": size} if size else {}))
    else:
        cfg = model_config(args.model, args.tasks or default_model_tasks(), size or (512, 512), **overrides)
    task = args.task or next(iter(cfg.tasks))
    if task not in cfg.tasks:
        raise CLIError(f"--task {task!r} is not one of the model's tasks {list(cfg.tasks)}")
    model = routing = None
    if args.image or need_model:
        from ..models import MultiTaskModel

        model = load_checkpoint(args.checkpoint) if args.checkpoint and not overrides else MultiTaskModel(cfg)
    if args.image:
        from ..data.images import read_image
        from ..hardware import trace_routing

        routing = trace_routing(model, read_image(args.image), task, size=cfg.img_size)
    return cfg, task, routing, model


def _simulate(args, cfg, task, routing) -> dict:
    from ..hardware import load_platform, simulate, sweep_experts

    if args.routing_alpha is not None and routing is not None:
        raise CLIError("--routing-alpha shapes synthetic routing; it cannot apply to a traced --image")
    platform = load_platform(args.platform)
    designs = args.designs or list(HW_DESIGNS)
    if not cfg.moe_blocks and not args.designs:
        designs = ["dense"]
    options = dict(task=task, designs=designs, include_heads=args.heads, cache_experts=args.cache_experts,
                   seed=args.seed, routing_alpha=args.routing_alpha)
    sim = simulate(cfg, platform, routing=routing, **options)
    if args.sweep_experts:
        if any(e < cfg.top_k for e in args.sweep_experts):
            raise CLIError(f"--sweep-experts values must be >= top_k={cfg.top_k}")
        sim.expert_sweep = sweep_experts(cfg, platform, args.sweep_experts, **options)
    return sim.to_dict(layers=True)


def _finish(args, report: dict, measured: dict | None = None) -> int:
    from ..hardware.report import simulation_text

    report = {"format": HW_REPORT_FORMAT, **report}
    if args.out:
        write_report(args.out, report)  # refuses a file not its own; a write failure names the path
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(simulation_text(report, measured))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def run_simulate(args) -> int:
    cfg, task, routing, _ = _inputs(args)
    return _finish(args, _simulate(args, cfg, task, routing))


def run_compare(args) -> int:
    import torch

    from ..hardware.measure import measure_pathway_latency

    if not 0 < args.cpu_power < float("inf") or (args.gpu_power is not None
                                                   and not 0 < args.gpu_power < float("inf")):  # NaN too
        raise CLIError("--cpu-power and --gpu-power must be finite and > 0 watts")
    cfg, task, routing, model = _inputs(args, need_model=True)
    report = _simulate(args, cfg, task, routing)
    devices = [("cpu", args.cpu_power)]
    if torch.cuda.is_available():
        devices.append(("cuda", args.gpu_power))
    measured = {}
    for device, power in devices:
        run = measure_pathway_latency(model, cfg.img_size, task, include_heads=args.heads, device=device,
                                      repeats=args.repeats)
        measured[device] = {**run, "latency_ms": run["median_ms"], "power_w": power,
                            "energy_j": None if power is None else power * run["median_ms"] / 1e3}
    report["measured"] = measured
    return _finish(args, report, measured)
