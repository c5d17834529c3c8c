"""Command-line interface: ``m3vit train | eval | infer | experts | analyze | export | hw | demo | study | models | flops
| data | serve``.

A failure the user caused (an ``M3ViTError`` or an ``OSError``) becomes one ``error:`` line on stderr and
exit code 2; anything else is a bug and shows its traceback. ``M3VIT_DEBUG=1`` shows every traceback."""

from __future__ import annotations

import argparse

from . import analyze, data, demo, experts, export, flops, hw, infer, models, serve, study, train
from . import eval as eval_command
from .common import CLIError, Parser, run_with_exit_code, setup_logging

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

#: One module per command, in the order ``m3vit --help`` lists them; each has ``add_parser(subparsers)``
#: and its handler(s), and imports PyTorch-dependent code only inside the handlers.
COMMANDS = (models, flops, hw, demo, study, train, eval_command, infer, experts, analyze, export, data, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="m3vit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    def parse_and_run() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        return args.func(args)

    return run_with_exit_code(parse_and_run)
