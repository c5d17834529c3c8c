"""``m3vit study``: single-task baselines and multi-task models over training seeds, Δm with intervals
(``m3vit.experiments.study``)."""

from __future__ import annotations

from .common import CLIError, positive_int, say


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="train single-task baselines and multi-task models over seeds; report "
                                            "Δm with intervals on validation and held-out scenes")
    p.add_argument("--out", required=True, help="output folder (resumable: finished runs are not retrained)")
    p.add_argument("--single", help="config (a file or a shipped name) trained once per task as the single-task "
                                    "baseline (default synthetic/mvit_tiny)")
    p.add_argument("--multi", nargs="+", metavar="NAME_OR_CONFIG",
                   help="NAME CONFIG pairs of multi-task runs (default: m3vit, m3vit_task_conditioned, m3vit_shared "
                        "and mvit on the shipped synthetic/ configs)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="training seeds per run: train.seed, train.seed + 1, ... (default 1; >= 2 for intervals)")
    p.add_argument("--heldout-seed", type=int,
                   help="data.seed of the held-out evaluation scenes (default data.seed + 1)")
    p.add_argument("--reference", default="mvit",
                   help="multi-task run the others' paired Δm is also taken against (default mvit)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import resolve_config_path
    from ..experiments import run_study

    multi = None
    if args.multi is not None:
        if len(args.multi) % 2:
            raise CLIError("--multi takes NAME CONFIG pairs, e.g. --multi m3vit synthetic/m3vit_tiny")
        multi = {name: resolve_config_path(path) for name, path in zip(args.multi[::2], args.multi[1::2])}
    single = resolve_config_path(args.single) if args.single else None
    study = run_study(args.out, multi, single, args.set or [], seeds=args.seeds, heldout_seed=args.heldout_seed,
                      reference=args.reference, fresh=args.fresh, say=say)
    print()
    print(study["table"])
    print(f"\ntraining time {study['train_seconds'] / 60:.1f} min over {len(study['seeds'])} seed(s); wrote "
          f"{args.out}/study.json, {args.out}/baselines.json, {args.out}/report.md and {args.out}/figures/study.png")
    return 0
