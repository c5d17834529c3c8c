"""``m3vit flops``: the FLOPs that actually execute, per task and component, of a named model or a checkpoint."""

from __future__ import annotations

import json

from .common import CLIError, default_model_tasks, positive_int

#: Keys ``--set`` may not set: they have their own options.
_OWN_OPTIONS = {"name": "--model", "tasks": "--tasks", "img_size": "--img-size"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flops", help="count the FLOPs that actually execute, per task and component")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="m3vit_small", help="registered model name (see 'm3vit models')")
    src.add_argument("--checkpoint", help="checkpoint directory instead of --model")
    p.add_argument("--tasks", nargs="+", help="task names (default: the five PASCAL-Context tasks)")
    p.add_argument("--img-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--set", action="append", metavar="model.KEY=VALUE",
                   help="model config override, e.g. --set model.num_experts=32 --set model.router=task_conditioned")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def model_overrides(items: list[str] | None) -> dict:
    """``--set model.KEY=VALUE`` items as ``create_model`` keyword overrides ``{KEY: VALUE}`` (values parsed as
    YAML), the same dotted keys as a run config's ``model`` section; any other key is one line naming the form."""
    from ..engine.config import parse_overrides

    overrides = {}
    for key, value in parse_overrides(items, key_form="model.key").items():
        section, dot, name = key.partition(".")
        if not dot:
            raise CLIError(f"--set {key}: model keys are dotted, as in every command: --set model.{key}=VALUE")
        if section != "model" or not name:
            raise CLIError(f"--set {key}: flops takes only model keys, model.KEY=VALUE "
                           f"(e.g. --set model.num_experts=32)")
        if name in _OWN_OPTIONS:
            raise CLIError(f"--set {key}: give it with {_OWN_OPTIONS[name]}")
        overrides[name] = value
    return overrides


def _build_model(args):
    import m3vit

    if args.checkpoint:
        if args.set:  # the checkpoint's config is what its weights were trained with
            raise CLIError(f"--set applies to --model; a --checkpoint is counted as it was saved (drop --set "
                           f"{args.set[0]})")
        return m3vit.load_checkpoint(args.checkpoint)
    return m3vit.create_model(args.model, args.tasks or default_model_tasks(), img_size=tuple(args.img_size),
                              **model_overrides(args.set))


def run(args) -> int:
    import m3vit

    model = _build_model(args)
    tasks = args.tasks if args.checkpoint else None
    report = m3vit.count_flops(model, tuple(args.img_size), tasks=tasks, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(report.to_text())
    return 0
