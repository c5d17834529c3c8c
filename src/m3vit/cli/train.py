"""``m3vit train``: train a run config (multi-task, checkpoints, ``--resume``, torchrun for DDP)."""

from __future__ import annotations

import shlex
import sys

from .common import CLIError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a run config (multi-task, checkpoints, --resume, torchrun for DDP)")
    p.add_argument("--config", help="run config: a YAML file or a shipped name such as synthetic/m3vit_tiny "
                   "(default: the built-in defaults)")
    p.add_argument("--out", required=True, help="run directory (must be empty unless --resume)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=100 --set data.size=[64,64]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import load_config, parse_overrides
    from ..engine.run_folder import RUN_CONFIG
    from ..engine.trainer import TrainingError, TrainingInterrupted, train

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
