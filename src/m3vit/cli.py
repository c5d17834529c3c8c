"""Command-line interface: ``m3vit train | eval | infer | experts | analyze | export | hw | demo | study | models | flops
| data | serve``.

A failure the user caused (an ``M3ViTError`` or an ``OSError``) becomes one ``error:`` line on stderr and
exit code 2; anything else is a bug and shows its traceback. ``M3VIT_DEBUG=1`` shows every traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

PASCAL_TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]
log = logging.getLogger("m3vit")


from .utils.errors import M3ViTError, one_line


class CLIError(M3ViTError):
    """A bad combination of command-line options: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value becomes one line naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parse_overrides(items: list[str]) -> dict:
    """Flat ``--set key=value`` model-config overrides (values parsed as YAML)."""
    from .engine.config import parse_overrides

    return parse_overrides(items, key_form="key")


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _table(headers: list[str], rows: list[list]) -> str:
    from .tables import format_table

    return format_table(headers, rows, cell=_num)


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


def _hw_inputs(args, need_model: bool = False):
    """(model config, traced routing or None, model or None) of ``hw simulate`` / ``hw compare``."""
    from .models import load_checkpoint, model_config
    from .models.checkpoint import verify_checkpoint

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
        cfg = model_config(args.model, args.tasks or PASCAL_TASKS, size or (512, 512), **overrides)
    task = args.task or next(iter(cfg.tasks))
    if task not in cfg.tasks:
        raise CLIError(f"--task {task!r} is not one of the model's tasks {list(cfg.tasks)}")
    model = routing = None
    if args.image or need_model:
        from .models import MultiTaskModel

        model = load_checkpoint(args.checkpoint) if args.checkpoint and not overrides else MultiTaskModel(cfg)
    if args.image:
        from .engine.inference import read_image
        from .hardware import trace_routing

        routing = trace_routing(model, read_image(args.image), task, size=cfg.img_size)
    return cfg, task, routing, model


def _hw_simulate(args, cfg, task, routing) -> dict:
    from .hardware import load_platform, simulate, sweep_experts

    if args.routing_alpha is not None and routing is not None:
        raise CLIError("--routing-alpha shapes synthetic routing; it cannot apply to a traced --image")
    platform = load_platform(args.platform)
    designs = args.designs or ["dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip"]
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


def _hw_finish(args, report: dict, measured: dict | None = None) -> int:
    from .hardware.report import simulation_text

    if args.out:
        _write_json_atomic(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(simulation_text(report, measured))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_hw_simulate(args) -> int:
    cfg, task, routing, _ = _hw_inputs(args)
    return _hw_finish(args, _hw_simulate(args, cfg, task, routing))


def cmd_hw_compare(args) -> int:
    import torch

    from .hardware.measure import measure_pathway_latency

    if not 0 < args.cpu_power < float("inf") or (args.gpu_power is not None
                                                   and not 0 < args.gpu_power < float("inf")):  # NaN too
        raise CLIError("--cpu-power and --gpu-power must be finite and > 0 watts")
    cfg, task, routing, model = _hw_inputs(args, need_model=True)
    report = _hw_simulate(args, cfg, task, routing)
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
    return _hw_finish(args, report, measured)


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_demo(args) -> int:
    from .experiments import DEFAULT_CONFIGS, run_demo
    from .engine.config import resolve_config_path

    configs = {"m3vit": resolve_config_path(args.m3vit_config or DEFAULT_CONFIGS["m3vit"]),
               "mvit": resolve_config_path(args.mvit_config or DEFAULT_CONFIGS["mvit"])}
    _say(f"m3vit demo: train M³ViT ({configs['m3vit']}) and M-ViT ({configs['mvit']}) on the same data and "
         f"budget, evaluate, compare -> {args.out}")
    if args.conflict_batches < 0:
        raise CLIError(f"--conflict-batches must be >= 0, got {args.conflict_batches}")
    result = run_demo(args.out, configs, args.set or [], fresh=args.fresh, latency_repeats=args.repeats,
                      samples=args.samples, conflict_batches=args.conflict_batches, say=_say)
    print()
    print(result.table)
    print(f"\nwrote {result.out}/results.json, {result.out}/report.md and {result.out}/figures/")
    return 0


# ==============================================================================================
# study: single-task baselines and multi-task models over training seeds (m3vit.experiments.study)
# ==============================================================================================
def cmd_study(args) -> int:
    from .experiments import run_study

    from .engine.config import resolve_config_path

    multi = None
    if args.multi is not None:
        if len(args.multi) % 2:
            raise CLIError("--multi takes NAME CONFIG pairs, e.g. --multi m3vit synthetic/m3vit_tiny")
        multi = {name: resolve_config_path(path) for name, path in zip(args.multi[::2], args.multi[1::2])}
    single = resolve_config_path(args.single) if args.single else None
    study = run_study(args.out, multi, single, args.set or [], seeds=args.seeds, heldout_seed=args.heldout_seed,
                      reference=args.reference, fresh=args.fresh, say=_say)
    print()
    print(study["table"])
    print(f"\ntraining time {study['train_seconds'] / 60:.1f} min over {len(study['seeds'])} seed(s); wrote "
          f"{args.out}/study.json, {args.out}/baselines.json, {args.out}/report.md and {args.out}/figures/study.png")
    return 0


def _add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="train single-task baselines and multi-task models over seeds; report Δm "
                                     "with intervals on validation and held-out scenes")
    p.add_argument("--out", required=True, help="output folder (resumable: finished runs are not retrained)")
    p.add_argument("--single", help="config (a file or a shipped name) trained once per task as the single-task "
                                    "baseline (default synthetic/mvit_tiny)")
    p.add_argument("--multi", nargs="+", metavar="NAME_OR_CONFIG",
                   help="NAME CONFIG pairs of multi-task runs (default: m3vit, m3vit_task_conditioned, m3vit_shared "
                        "and mvit on the shipped synthetic/ configs)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="training seeds per run: train.seed, train.seed + 1, ... (default 1; >= 2 for intervals)")
    p.add_argument("--heldout-seed", type=int, help="data.seed of the held-out evaluation scenes (default data.seed + 1)")
    p.add_argument("--reference", default="mvit",
                   help="multi-task run the others' paired Δm is also taken against (default mvit)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.set_defaults(func=cmd_study)
# ============================== end of study ==================================================


def cmd_train(args) -> int:
    from .engine.config import load_config, parse_overrides
    from .engine.run_folder import RUN_CONFIG
    from .engine.trainer import TrainingError, TrainingInterrupted, train

    cfg = load_config(args.config, parse_overrides(args.set))
    try:
        result = train(cfg, args.out, resume=args.resume)
    except TrainingError as exc:
        raise CLIError(str(exc)) from None
    except TrainingInterrupted as exc:
        where = (f"it continues from {exc.checkpoint}" if exc.checkpoint is not None else
                 "no checkpoint was saved yet, so it starts from step 0")
        command = (f"m3vit train --config {shlex.quote(str(exc.out_dir / RUN_CONFIG))} "
                   f"--out {shlex.quote(str(exc.out_dir))} --resume")
        if exc.rank == 0:
            print(f"interrupted at step {exc.step} of {exc.total_steps}; to resume: {command} ({where})",
                  file=sys.stderr)
        return 130
    if result.rank == 0 and result.steps_run == 0:  # a resumed run that was already finished
        print(f"run {result.out_dir} is finished (step {result.steps} of {result.steps}); to train longer pass "
              f"--set train.steps=N with N > {result.steps}")
        print(f"final model: {result.final_dir} (log: {result.log_path})")
    elif result.rank == 0:
        start = f", resumed at step {result.start_step}" if result.resumed else ""
        procs = f" on {result.world_size} processes" if result.world_size > 1 else ""
        print(f"trained {cfg.model.name} for {result.steps} steps{start}{procs} in {result.seconds:.1f} s "
              f"({result.images_per_s:.1f} images/s); loss {result.last_losses.get('loss', float('nan')):.4g}")
        print(f"final model: {result.final_dir} (log: {result.log_path})")
    return 0


def cmd_data_show(args) -> int:
    from .data import build_dataset
    from .data.show import render_grid

    if args.start < 0:
        raise CLIError("--start must be >= 0")
    options = {"size": tuple(args.size)} if args.size else {}
    if args.dataset == "synthetic":
        options["length"] = args.start + args.num
        options["people"] = args.people
    elif args.people is not None:
        raise CLIError("--people applies to the synthetic scenes only")
    dataset = build_dataset(args.dataset, args.split, root=args.root, seed=args.seed, tasks=args.tasks, **options)
    stop = min(args.start + args.num, len(dataset))
    if args.start >= stop:
        raise CLIError(f"--start {args.start} is past the end of the {args.split} split ({len(dataset)} samples)")
    path = render_grid(dataset, list(range(args.start, stop)), args.out)
    print(f"wrote {path} ({stop - args.start} {args.dataset} {args.split} samples: image + "
          f"{', '.join(dataset.tasks)})")
    return 0


def _device(name: str) -> str:
    from .engine.trainer import resolve_device

    return resolve_device(name, key="--device").type


def _write_json_atomic(path: str, data: dict) -> None:
    from .utils.io import write_json

    write_json(path, data)  # a write failure is an OutputError naming the path


def _metric_text(task: str, metric: str, value: float) -> str:
    from .tasks.registry import task_class

    arrow = "↑" if task_class(task).metric_higher_is_better(metric) else "↓"
    number = f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return f"{metric}{arrow} {number}"


def _eval_table(metrics: dict) -> str:
    """One row per task: its primary metric, then the other headline metrics (per-class IoU: JSON only)."""
    from .tasks.registry import task_class

    rows = [["task", "main metric", "other metrics"]]
    for task, values in metrics.items():
        cls = task_class(task)
        order = [cls.primary_metric] + [m for m in cls.higher_is_better if m != cls.primary_metric]
        order += [m for m in values if m not in order and "/" not in m]
        shown = [m for m in order if m in values]
        rows.append([task, _metric_text(task, shown[0], values[shown[0]]) if shown else "-",
                     ", ".join(_metric_text(task, m, values[m]) for m in shown[1:])])
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])} | {r[1].ljust(widths[1])} | {r[2]}".rstrip() for r in rows]
    lines.insert(1, f"{'-' * widths[0]}-+-{'-' * widths[1]}-+-{'-' * max(len(r[2]) for r in rows)}")
    return "\n".join(lines)


_FIXED_POINT_OPTIONS = ("weight_bits", "weight_int_bits", "bias_bits", "bias_int_bits", "act_bits", "act_int_bits",
                        "rounding", "overflow")


def _fixed_point_formats(args) -> dict | None:
    """The ``--fixed-point`` formats (weight, bias, activation), or None without the flag; bad bits: CLIError."""
    from .efficiency.fixed_point import DEFAULT_ACTIVATION, DEFAULT_BIAS, DEFAULT_WEIGHT, FixedPoint

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
    from .efficiency.fixed_point import metric_delta, quantize_model

    fixed = quantize_model(model, formats["weight"], formats["activation"], bias_format=formats["bias"])
    metrics = run_eval(fixed)
    summary = fixed.summary()
    return {"formats": summary.pop("formats"), "metrics": metrics, "delta": metric_delta(float_metrics, metrics),
            "saturation": summary}


def _fixed_point_text(block: dict) -> str:
    """Table of the headline metrics, float vs fixed point, then one line of saturation counts."""
    from .tasks.registry import task_class

    f = block["formats"]
    lines = [f"fixed point: weights {f['weight']['format']}, biases and norms {f['bias']['format']}, activations "
             f"{f['activation']['format']} (round {f['weight']['rounding']}, {f['weight']['overflow']} on overflow):"]
    rows = []
    for task, deltas in block["delta"].items():
        cls = task_class(task)
        for metric in sorted((m for m in deltas if "/" not in m), key=lambda m: m != cls.primary_metric):
            fixed = block["metrics"][task][metric]
            arrow = "↑" if cls.metric_higher_is_better(metric) else "↓"
            rows.append([task, metric + arrow, f"{fixed - deltas[metric]:.4f}", f"{fixed:.4f}", f"{deltas[metric]:+.4f}"])
    lines.append(_table(["task", "metric", "float", "fixed", "change"], rows))
    sat = block["saturation"]
    worst = max(sat["activations"]["saturated_modules"].items(), key=lambda kv: kv[1]["saturated"], default=None)
    lines.append(f"saturated: {sat['weights']['saturated']} of {sat['weights']['values']} weights, "
                 f"{sat['activations']['saturated']} of {sat['activations']['values']} activation values"
                 + (f" (most in {worst[0]}: {worst[1]['saturated']})" if worst else "")
                 + f"; largest activation magnitude {sat['activations']['max_abs']:.4g}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .engine.builders import build_eval_dataset
    from .engine.checkpoints import checkpoint_step, load_run
    from .engine.evaluator import evaluate
    from .tasks import delta_m, load_baselines, reference_baselines_path, reference_delta_m
    from .tasks.delta import REFERENCE_DELTA_M_EXCLUDES

    formats = _fixed_point_formats(args)
    if args.onnx and formats is not None:
        raise CLIError("--fixed-point emulates the PyTorch model: it cannot be combined with --onnx")
    model, cfg = load_run(args.checkpoint, args.set or [], map_location=_device(args.device))
    if args.onnx:  # the ONNX file's predictions, scored on the checkpoint's run data
        from .efficiency.onnx_export import OnnxError
        from .efficiency.onnx_model import OnnxModel

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
        _write_json_atomic(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    step = "" if report["step"] is None else f" (step {report['step']})"
    how = "each task through its own pathway" if args.pathway == "single" else "all tasks in one forward"
    protocol = (" (official protocol: class maps resized nearest, saliency and normals as 8-bit PNGs)"
                if reference else "")
    what = f"{args.onnx} (onnxruntime; data of {args.checkpoint})" if args.onnx else f"{args.checkpoint}{step}"
    print(f"{what} on {cfg.data.name} {split}, {num_samples} samples, {how}{protocol}:")
    print(_eval_table(metrics))
    if dm is not None:
        left_out = sorted(set(tasks) - set(dm_tasks))
        note = f"; {', '.join(left_out)} left out as officially" if left_out else ""
        print(f"Δm vs {baselines_path}: {dm:+.2f}% (mean relative gain of each task's main metric over "
              f"{', '.join(dm_tasks)}{note})")
    elif reference and baselines is None:
        print(f"Δm: the paper has no single-task baselines for {cfg.data.name}; give them with --baselines")
    if formats is not None:
        print()
        print(_fixed_point_text(report["fixed_point"]))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_infer(args) -> int:
    from .engine.inference import MAX_PIXELS, infer_files
    from .models import load_checkpoint

    if args.max_pixels is not None and args.max_pixels < 0:
        raise CLIError(f"--max-pixels must be >= 1 (or 0 for no limit but PIL's own), got {args.max_pixels}")
    max_pixels = MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    if args.stream_experts:
        from .efficiency import load_streaming_model

        model = load_streaming_model(args.checkpoint, map_location=_device(args.device))
    else:
        model = load_checkpoint(args.checkpoint, map_location=_device(args.device))
    tasks = model.resolve_tasks(args.task)
    result = infer_files(model, args.images, tasks, args.out, size=args.size, save_npy=args.npy,
                         max_pixels=max_pixels)
    for _, reason in result.failed:
        print(f"error: {reason}", file=sys.stderr)
    print(f"wrote {len(result.written)} files for {len(result.processed)} image(s) x {len(tasks)} task(s) "
          f"({', '.join(tasks)}) to {args.out}" + (f"; {len(result.failed)} image(s) could not be read" if result.failed else ""))
    return 1 if result.failed else 0


def cmd_experts(args) -> int:
    from .engine.builders import build_eval_dataset
    from .engine.checkpoints import checkpoint_step, load_run
    from .analysis.experts import expert_usage, moe_block_indices, plot_heatmaps, write_summary, write_usage
    from .utils.io import OutputFolder

    model, cfg = load_run(args.checkpoint, args.set or [], map_location=_device(args.device))
    if not model.moe_layers:
        raise CLIError(f"{args.checkpoint}: model {model.config.name!r} is dense (no MoE layer); expert usage "
                       f"needs an MoE checkpoint")
    if not 0 < args.threshold <= 1:
        raise CLIError(f"--threshold must be in (0, 1], got {args.threshold}")
    tasks = model.resolve_tasks(args.tasks)
    split = args.split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, split=split)
    batch_size = cfg.eval.batch_size if args.eval_batch_size is None else args.eval_batch_size
    extra = {"checkpoint": str(args.checkpoint), "step": checkpoint_step(args.checkpoint),
             "data": {**cfg.to_dict()["data"], "split": split}}
    with OutputFolder(args.out, kind="experts") as out:
        # Before the work: none of the outputs may replace a file m3vit did not write.
        out.claim(["usage.json", "summary.md", *(f"experts_block{b}.png" for b in moe_block_indices(model)),
                   "experts_all.png"])
        usage = expert_usage(model, dataset, tasks, limit=args.limit, batch_size=batch_size,
                             progress=not args.json and sys.stderr.isatty())
        pictures = plot_heatmaps(usage, out.path, threshold=args.threshold)
        json_path = write_usage(usage, out.path("usage.json"), threshold=args.threshold, extra=extra)
        write_summary(usage, out.path("summary.md"), threshold=args.threshold)
    if args.json:
        print(json.dumps({**extra, **usage.to_dict(args.threshold)}, indent=2))
        return 0
    print(f"{args.checkpoint}: expert usage of {len(tasks)} task(s) on {usage.num_images} {cfg.data.name} {split} "
          f"images, top-{usage.top_k} of {usage.num_experts} experts; core = the fewest experts taking "
          f">= {args.threshold:.0%} of a task's assignments")
    for layer in usage.summary(args.threshold):
        cores = ", ".join(f"{t} {len(c)} ({' '.join(f'e{e}' for e in c)})" for t, c in layer["core_experts"].items())
        print(f"block {layer['block']}: core experts per task: {cores}")
        if layer["mean_jaccard"] is not None:
            shared = ", ".join(f"e{s['expert']} ({s['tasks']} tasks)" for s in layer["most_shared"])
            print(f"  mean pairwise overlap: Jaccard {layer['mean_jaccard']:.2f}, shared assignments "
                  f"{layer['mean_shared']:.2f}; most shared: {shared or '-'}")
        if layer["mutual_information"] is not None:
            print(f"  task–expert mutual information: {layer['mutual_information']:.3f} bits "
                  f"(0: no specialisation; log2 of the number of tasks: each task on its own experts)")
    print(f"wrote {json_path}, summary.md and {len(pictures)} heatmaps in {args.out}")
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_export(args) -> int:
    from .efficiency.export import INT8_FILE, ONNX_FILE, export_checkpoint
    from .efficiency.onnx_export import OnnxError

    if not 0 <= args.min_usage < 1:
        raise CLIError(f"--min-usage must be in [0, 1) (a share of the task's expert assignments), got {args.min_usage}")
    if args.int8 is not None and not args.onnx:
        raise CLIError("--int8 quantises the ONNX file: add --onnx")
    try:
        report = export_checkpoint(args.checkpoint, args.task, args.out, calibration=args.calibration,
                                   min_usage=args.min_usage, gate_softmax=args.gate_softmax, onnx=args.onnx,
                                   int8=args.int8, batch_size=args.eval_batch_size,
                                   device=_device(args.device), overrides=args.set or [])
    except OnnxError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    data = report.extra.get("data", {})
    softmax = "every expert (exact)" if report.gate_softmax == "all" else "the kept experts (renormalised)"
    print(f"{args.checkpoint} -> {args.out}: task {report.task}, {report.num_images} calibration images "
          f"({data.get('name')} {data.get('split')}), experts kept above {report.min_usage:g} of the task's "
          f"assignments, gate softmax over {softmax}")
    for layer in report.layers:
        total = len(layer.kept) + len(layer.removed)
        removed = ("none removed" if not layer.removed else
                   f"removed {' '.join(f'e{e}' for e in layer.removed)}; {layer.rerouted_share:.1%} of assignments rerouted")
        print(f"  block {layer.block}: kept {len(layer.kept)}/{total} experts, top-{layer.top_k} ({removed})")
    d = report.to_dict()
    print(f"parameters: {report.params_before / 1e6:.3f} M -> {report.params_after / 1e6:.3f} M "
          f"({-d['param_reduction']:+.1%}; the task's pathway with every expert: {report.params_pathway / 1e6:.3f} M, "
          f"{-d['param_reduction_vs_pathway']:+.1%})")
    print(f"file size: {_megabytes(report.file_bytes_before)} -> {_megabytes(report.file_bytes_after)} "
          f"({-d['file_bytes_reduction']:+.1%})")
    if report.metrics_before is not None:
        change = ", ".join(f"{m} {report.metrics_before[m]:.3f} -> {report.metrics_after[m]:.3f} ({v:+.3f})"
                           for m, v in report.metric_change.items())
        print(f"{report.task} on the calibration set: {change}")
    same = " (identical)" if report.max_abs_diff == 0 else ""
    print(f"max abs prediction difference vs the original pathway: {report.max_abs_diff:.3g}{same}")
    if report.onnx is not None:
        checked = (f"onnxruntime max abs diff {report.onnx['max_abs_diff']:.3g} (<= {report.onnx['tolerance']:g})"
                   if report.onnx["checked"] else "not checked: onnxruntime is not installed")
        print(f"onnx: {report.onnx['file']} ({_megabytes(report.onnx['bytes'])}), {checked}")
        int8 = report.onnx["int8"]
        if int8 is not None:
            print(f"int8 ({int8['method']}): {int8['file']} ({_megabytes(int8['bytes'])}, {int8['size_ratio']:.2f}x the "
                  f"float file), max abs diff vs float on {int8['num_images']} calibration images "
                  f"{int8['max_abs_diff_vs_fp32']:.3g}")
    files = ["model.safetensors", "config.yaml", "export.json"] + [ONNX_FILE] * args.onnx + [INT8_FILE] * (args.int8 is not None)
    print(f"wrote {args.out} ({', '.join(files)})")
    return 0


# ---- serve (begin) ----------------------------------------------------------------------------
# `m3vit serve`: the web app and HTTP API of m3vit.serve. Kept in one block (parser + handler).
def cmd_serve(args) -> int:
    from .serve import bind_socket, create_app, require_serve_extra, serve

    try:
        require_serve_extra()
    except ImportError as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    try:  # before loading the model: a port in use fails at once
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        app = create_app(args.checkpoint, stream_experts=args.stream_experts, device=_device(args.device),
                         workers=args.workers, queue_size=args.queue_size, max_upload_mb=args.max_upload_mb,
                         max_pixels=args.max_pixels)
    except BaseException:
        sock.close()
        raise
    info = app.state.service.info()

    def ready(url: str) -> None:
        experts = "experts streamed from the checkpoint" if info["streaming"] else "experts resident"
        print(f"m3vit serve: {info['model']} ({', '.join(info['tasks'])}; {experts}; {info['device']}) "
              f"at {url}  (Ctrl-C to stop)", flush=True)

    try:
        serve(app, sock=sock, log_level="info" if args.verbose else "warning", on_ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
        pass
    finally:
        app.state.service.close()  # already closed by the app's shutdown, unless uvicorn failed to start
    print("m3vit serve: stopped", flush=True)
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page and HTTP API: one loaded model answering any subset of its tasks")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (loaded once)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--stream-experts", action="store_true",
                   help="keep expert weights in the checkpoint file and read them two at a time per MoE layer")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="N",
                   help="largest upload accepted, in MB (default 20; larger: 413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest image accepted, in pixels (default 16777216 = 4096x4096; larger: 413)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="model replicas, each answering one request at a time on its own thread (default 1; each "
                        "replica holds its own copy of the weights)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="requests that may wait for a free replica (default 8); more at once get 503")
    p.set_defaults(func=cmd_serve)
# ---- serve (end) ------------------------------------------------------------------------------


# ==============================================================================================
# analyze: gradient conflicts between tasks and two checkpoints compared (m3vit.analysis)
# ==============================================================================================
def _analyze_checks(args) -> None:
    from .utils.errors import InputError

    if args.batches < 1:
        raise InputError(f"--batches must be >= 1, got {args.batches}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.eval_batch_size}")


def cmd_analyze_conflicts(args) -> int:
    from .analysis import plot_conflict_evolution, plot_conflict_matrices
    from .analysis.checkpoints import checkpoint_conflicts, conflicts_text, run_checkpoints

    _analyze_checks(args)
    options = dict(tasks=args.tasks, batches=args.batches, batch_size=args.eval_batch_size, split=args.split,
                   device=_device(args.device))
    if args.run:
        steps = run_checkpoints(args.run)
        reports = {}
        for step, path in steps:
            if not args.json:
                _say(f"step {step}: {path}")
            reports[step] = checkpoint_conflicts(path, args.set or [], **options)
    else:
        report = checkpoint_conflicts(args.checkpoint, args.set or [], **options)
        reports = {report.info["step"]: report}
    last = reports[max(reports, key=lambda s: -1 if s is None else s)]
    data = ({"checkpoint": args.checkpoint, **last.to_dict()} if not args.run else
            {"run": args.run, "steps": {str(step): r.to_dict() for step, r in reports.items()}})
    written = []
    if args.out:
        from .utils.io import OutputFolder, write_json, write_text

        with OutputFolder(args.out, kind="analysis") as out:
            out.claim(["conflicts.json", "conflicts.md", "conflicts.png", "evolution.png"])
            written.append(write_json(out.path("conflicts.json"), data))
            title = f"Gradient conflicts of {args.checkpoint or args.run}"
            written.append(write_text(out.path("conflicts.md"), "\n".join(
                r.to_markdown(f"{title}" + ("" if not args.run else f", step {step}"))
                for step, r in reports.items())))
            label = f"step {last.info['step']}" if last.info.get("step") is not None else "checkpoint"
            written.append(plot_conflict_matrices({label: last.mean_cosine}, last.tasks, out.path("conflicts.png")))
            if args.run and len(reports) > 1:
                written.append(plot_conflict_evolution(reports, out.path("evolution.png")))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(conflicts_text(reports))
    if written:
        print(f"wrote {', '.join(os.path.basename(str(p)) for p in written)} in {args.out}")
    return 0


def cmd_analyze_compare(args) -> int:
    import numpy as np

    from .analysis import plot_conflict_matrices
    from .analysis.checkpoints import compare_checkpoints, compare_text

    _analyze_checks(args)
    if args.limit is not None and args.limit < 1:
        from .utils.errors import InputError

        raise InputError(f"--limit must be >= 1, got {args.limit}")
    result = compare_checkpoints(args.checkpoints[0], args.checkpoints[1], args.set or [], names=args.names,
                                 batches=args.batches, batch_size=args.eval_batch_size, limit=args.limit,
                                 split=args.split, device=_device(args.device))
    written = []
    if args.out:
        from .utils.io import OutputFolder, write_json

        with OutputFolder(args.out, kind="analysis") as out:
            out.claim(["compare.json", "conflicts.png"])
            written.append(write_json(out.path("compare.json"), result))
            matrices = {name: np.array(c["conflicts"]["cosine"], dtype=float)
                        for name, c in result["checkpoints"].items()}
            written.append(plot_conflict_matrices(matrices, result["tasks"], out.path("conflicts.png")))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(compare_text(result))
    if written:
        print(f"wrote {', '.join(os.path.basename(str(p)) for p in written)} in {args.out}")
    return 0


def _add_analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="gradient conflicts between tasks; compare two checkpoints' specialisation")
    analyze = p.add_subparsers(dest="analyze_command", required=True, parser_class=_Parser)

    def common(q, batches_help: str) -> None:
        q.add_argument("--batches", type=int, default=4, help=batches_help)
        q.add_argument("--batch-size", dest="eval_batch_size", type=int, help="default: the run's eval.batch_size")
        q.add_argument("--split", help="dataset split (default: the run's data.val_split)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="run config override of the data, e.g. --set data.seed=3")
        q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        q.add_argument("--out", help="also write JSON, Markdown and figures to this folder")
        q.add_argument("--json", action="store_true", help="print the results as JSON")

    q = analyze.add_parser("conflicts", help="cosine of the tasks' backbone gradients (< 0: the tasks conflict), "
                                             "for one checkpoint or along a run's step-N/ checkpoints")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (e.g. RUN/final)")
    src.add_argument("--run", help="training run folder: every checkpoints/step-N/ and final/ in step order")
    q.add_argument("--tasks", nargs="+", help="tasks to compare (default: every task of the model)")
    common(q, "validation batches per checkpoint (default 4)")
    q.set_defaults(func=cmd_analyze_conflicts)

    q = analyze.add_parser("compare", help="two checkpoints side by side: task-expert mutual information and "
                                           "expert overlap per MoE layer, and gradient conflicts, on the same data")
    q.add_argument("checkpoints", nargs=2, metavar="CHECKPOINT", help="two checkpoint directories (A and B)")
    q.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the two (default: their paths)")
    q.add_argument("--limit", type=int, help="images for the expert usage (default: the whole split)")
    common(q, "validation batches for the gradient conflicts (default 4)")
    q.set_defaults(func=cmd_analyze_compare)
# ============================== end of analyze ================================================


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
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. --set num_experts=32 --set router=task_conditioned")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("hw", help="model of the M³ViT FPGA accelerator: simulate designs, compare with this machine")
    hw = p.add_subparsers(dest="hw_command", required=True, parser_class=_Parser)
    for name, helptext, func in (
        ("simulate", "latency, DRAM traffic, on-chip memory and energy of the dense / token-by-token / "
                     "reordered / all-on-chip dataflows", cmd_hw_simulate),
        ("compare", "the simulated FPGA designs beside measured latency on this machine's CPU (and GPU)",
         cmd_hw_compare),
    ):
        p = hw.add_parser(name, help=helptext)
        p.add_argument("--platform", default="zcu104", help="packaged platform (zcu104, zcu102) or a platform YAML")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", default="m3vit_small", help="registered model name (see 'm3vit models')")
        src.add_argument("--checkpoint", help="checkpoint directory instead of --model")
        p.add_argument("--tasks", nargs="+", help=f"tasks of --model (default: {' '.join(PASCAL_TASKS)})")
        p.add_argument("--task", help="the task whose pathway runs (default: the model's first task)")
        p.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                       help="input size (default 512 512, or the checkpoint's img_size)")
        p.add_argument("--experts", type=_positive_int, help="override the number of experts per MoE layer")
        p.add_argument("--top-k", type=_positive_int, help="override the experts per token")
        p.add_argument("--image", help="trace the routing of this image through --checkpoint (default: synthetic)")
        p.add_argument("--routing-alpha", type=float,
                       help="synthetic routing skew: expert popularity ~ Dirichlet(alpha) (default: uniform)")
        p.add_argument("--seed", type=int, default=0, help="seed of the synthetic routing")
        p.add_argument("--cache-experts", type=_positive_int, help="expert cache of the token-by-token design (default: top-k)")
        p.add_argument("--designs", nargs="+", choices=["dense", "moe_no_reorder", "moe_reorder", "moe_all_on_chip"])
        p.add_argument("--heads", action="store_true",
                       help="include the task's decoder (default: backbone only, as the paper's FPGA figures)")
        p.add_argument("--sweep-experts", nargs="+", type=_positive_int, metavar="N",
                       help="also report on-chip memory and latency for these expert counts, e.g. 8 16 32 64")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--out", help="also write the JSON report to this file")
        if name == "compare":
            p.add_argument("--cpu-power", type=float, required=True, metavar="W",
                           help="power drawn by this machine's CPU while it runs the model (energy = W x latency)")
            p.add_argument("--gpu-power", type=float, metavar="W", help="power of the GPU, when one is present")
            p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per device (median reported)")
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="train M³ViT and dense M-ViT on synthetic scenes, evaluate, compare, report")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out/)")
    p.add_argument("--m3vit-config", help="run config of the MoE model: a file or a shipped name (default synthetic/m3vit_tiny)")
    p.add_argument("--mvit-config", help="run config of the dense model: a file or a shipped name (default synthetic/mvit_tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override for both runs, e.g. --set train.steps=20 --set data.val_length=8")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed latency repeats per setting (median reported)")
    p.add_argument("--samples", type=_positive_int, default=3, help="validation images in the prediction figures")
    p.add_argument("--conflict-batches", type=int, default=2,
                   help="validation batches for the gradient-conflict matrices of both models (0: skip)")
    p.set_defaults(func=cmd_demo)

    _add_study_parser(sub)

    p = sub.add_parser("train", help="train a run config (multi-task, checkpoints, --resume, torchrun for DDP)")
    p.add_argument("--config", help="run config: a YAML file or a shipped name such as synthetic/m3vit_tiny "
                   "(default: the built-in defaults)")
    p.add_argument("--out", required=True, help="run directory (must be empty unless --resume)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=100 --set data.size=[64,64]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint, each task through its own sparse pathway")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/final)")
    p.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: every task of the model)")
    p.add_argument("--split", help="dataset split (default: the run's data.val_split)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="run config override, e.g. --set data.seed=3 --set data.val_length=8")
    p.add_argument("--limit", type=_positive_int, help="score only the first N samples")
    p.add_argument("--batch-size", dest="eval_batch_size", type=_positive_int, help="default: the run's eval.batch_size")
    p.add_argument("--pathway", choices=["single", "all"], default="single",
                   help="single: each task alone (as deployed); all: every task in one batched forward")
    p.add_argument("--baselines", help="single-task metrics (JSON or run folder) for Δm (default: eval.baselines; "
                   "with --protocol reference the paper's baselines of the dataset)")
    p.add_argument("--protocol", choices=["default", "reference"], default="default",
                   help="default: float predictions upsampled bilinearly to each label; reference: the official "
                   "M³ViT evaluation (class maps resized nearest, saliency and normals scored from 8-bit maps, Δm "
                   "against the paper's baselines without edge); see docs/reference.md")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
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
    fx.add_argument("--weight-int-bits", type=int, metavar="N", help="integer bits of a weight, sign included (default 2)")
    fx.add_argument("--bias-bits", type=int, metavar="N", help="bits of biases, embeddings and norm parameters (default 16)")
    fx.add_argument("--bias-int-bits", type=int, metavar="N", help="their integer bits, sign included (default 5)")
    fx.add_argument("--act-bits", type=int, metavar="N", help="bits of every activation (default 32)")
    fx.add_argument("--act-int-bits", type=int, metavar="N", help="integer bits of an activation, sign included (default 10)")
    fx.add_argument("--rounding", choices=["nearest", "floor"],
                    help="nearest: ties to even (default); floor: truncate towards -inf (HLS ap_fixed default)")
    fx.add_argument("--overflow", choices=["saturate", "wrap"],
                    help="saturate: clip to the range (default); wrap: two's complement (HLS ap_fixed default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("infer", help="predict tasks for image files; write coloured PNGs (and raw .npy)")
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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--stream-experts", action="store_true",
                   help="keep expert weights in the checkpoint file and read them two at a time per MoE layer "
                        "(less memory, same predictions; see m3vit.efficiency.streaming)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size; PNG, JPEG, ...)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("experts", help="per task and MoE layer, how often each expert is chosen; heatmaps")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory of an MoE model")
    p.add_argument("--out", required=True, help="output folder for usage.json and the heatmap PNGs")
    p.add_argument("--tasks", nargs="+", help="tasks to analyse (default: every task of the model)")
    p.add_argument("--split", help="dataset split (default: the run's data.val_split)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override, e.g. --set data.seed=3")
    p.add_argument("--limit", type=_positive_int, help="use only the first N samples")
    p.add_argument("--batch-size", dest="eval_batch_size", type=_positive_int, help="default: the run's eval.batch_size")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="a task's core experts take at least this share of its assignments (default 0.9)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true", help="print usage.json's content")
    p.set_defaults(func=cmd_experts)

    _add_analyze_parser(sub)  # analyze conflicts | compare

    p = sub.add_parser("export", help="extract one task into a standalone checkpoint with only the experts it uses")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/final)")
    p.add_argument("--task", required=True, help="the task to extract")
    p.add_argument("--out", required=True, help="output checkpoint directory (replaced atomically)")
    p.add_argument("--calibration", type=_positive_int, default=64, metavar="N",
                   help="calibration images: the first N of the run's validation split (default 64)")
    p.add_argument("--min-usage", type=float, default=0.0, metavar="F",
                   help="keep experts taking more than this share of the task's assignments (default 0: every "
                        "expert the task used; predictions on the calibration images are unchanged)")
    p.add_argument("--gate-softmax", choices=["all", "kept"], default="all",
                   help="all: softmax over every expert's gate logit, weights unchanged (exact); kept: only the "
                        "kept experts' gate rows, routing renormalised over them")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (checked against PyTorch with onnxruntime when installed)")
    p.add_argument("--int8", nargs="?", const="static", choices=["static", "dynamic"], metavar="METHOD",
                   help="also write model.int8.onnx with onnxruntime's quantiser: static (the default: convolutions and "
                        "linear layers int8, activation ranges calibrated on the calibration images) or dynamic "
                        "(linear layers only, no calibration: more accurate, less fast)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override, e.g. --set data.seed=3")
    p.add_argument("--batch-size", dest="eval_batch_size", type=_positive_int, help="default: the run's eval.batch_size")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true", help="print the report (export.json) as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="look at a dataset")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data.add_parser("show", help="write a PNG grid of samples: the image and every label, coloured")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "pascal_context", "nyud"])
    p.add_argument("--root", help="dataset root (PASCAL_MT or NYUD_MT tree; not needed for synthetic)")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", nargs="+", help="labels to show (default: every task of the dataset)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="render size of the synthetic scenes (default 128 128); for real data: resize to this")
    p.add_argument("--num", type=_positive_int, default=4, help="number of samples (rows)")
    p.add_argument("--start", type=int, default=0, help="index of the first sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--people", choices=["sparse", "close"],
                   help="synthetic scenes: people in ~3/4 of the scenes, far (sparse, default) or 1-2 near the camera")
    p.add_argument("--out", default="samples.png", help="PNG to write")
    p.set_defaults(func=cmd_data_show)

    _add_serve_parser(sub)  # serve: see the block above build_parser
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (M3ViTError, OSError) as exc:  # the user's to fix; anything else is a bug: its traceback shows
        if os.environ.get("M3VIT_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
