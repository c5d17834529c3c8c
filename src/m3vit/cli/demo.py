"""``m3vit demo``: train M³ViT and dense M-ViT on synthetic scenes, evaluate, compare and report
(``m3vit.experiments.demo``)."""

from __future__ import annotations

from .common import CLIError, positive_int, say


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train M³ViT and dense M-ViT on synthetic scenes, evaluate, compare, "
                                           "report")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out/)")
    p.add_argument("--m3vit-config", help="run config of the MoE model: a file or a shipped name "
                                          "(default synthetic/m3vit_tiny)")
    p.add_argument("--mvit-config", help="run config of the dense model: a file or a shipped name "
                                         "(default synthetic/mvit_tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override for both runs, e.g. --set train.steps=20 --set data.val_length=8")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed latency repeats per setting (median reported)")
    p.add_argument("--samples", type=positive_int, default=3, help="validation images in the prediction figures")
    p.add_argument("--conflict-batches", type=int, default=2,
                   help="validation batches for the gradient-conflict matrices of both models (0: skip)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import resolve_config_path
    from ..experiments import DEFAULT_CONFIGS, run_demo

    configs = {"m3vit": resolve_config_path(args.m3vit_config or DEFAULT_CONFIGS["m3vit"]),
               "mvit": resolve_config_path(args.mvit_config or DEFAULT_CONFIGS["mvit"])}
    say(f"m3vit demo: train M³ViT ({configs['m3vit']}) and M-ViT ({configs['mvit']}) on the same data and "
        f"budget, evaluate, compare -> {args.out}")
    if args.conflict_batches < 0:
        raise CLIError(f"--conflict-batches must be >= 0, got {args.conflict_batches}")
    result = run_demo(args.out, configs, args.set or [], fresh=args.fresh, latency_repeats=args.repeats,
                      samples=args.samples, conflict_batches=args.conflict_batches, say=say)
    print()
    print(result.table)
    print(f"\nwrote {result.out}/results.json, {result.out}/report.md and {result.out}/figures/")
    return 0
