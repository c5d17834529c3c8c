"""What every command shares: the one-line usage error, the parser class, argument types and shared options,
the error-to-exit-code contract and logging setup. Imports nothing heavy: building the parser loads no PyTorch."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from ..utils.errors import M3ViTError, one_line
from .choices import DEVICES

#: Default tasks of ``--model`` (flops, hw): the PASCAL-Context five. A task literal kept here, in one place,
#: until the tasks' own API names the dataset's tasks.


def default_model_tasks() -> list[str]:
    """The tasks of a named model given without ``--tasks``: PASCAL-Context's five, in the canonical task order."""
    from ..data.pascal_context import PascalContextMT
    from ..tasks.registry import TASK_CLASSES

    return [cls.name for cls in TASK_CLASSES if cls.name in PascalContextMT.all_tasks]


class CLIError(M3ViTError):
    """A bad combination of command-line options: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line instead of usage + message."""

    def error(self, message):
        raise CLIError(f"{self.prog}: {message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value becomes one line naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_device_option(parser) -> None:
    """``--device auto|cpu|cuda`` (default auto), resolved by ``device()`` in the handler."""
    parser.add_argument("--device", choices=DEVICES, default="auto")


def device(name: str) -> str:
    """The torch device type ``--device NAME`` resolves to (``cuda`` without a GPU: one-line error)."""
    from ..engine.device import resolve_device

    return resolve_device(name, key="--device").type


def say(line: str) -> None:
    """A progress line of a long command, shown at once."""
    print(line, flush=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def run_with_exit_code(command: Callable[[], int]) -> int:
    """Run ``command`` under the error contract and return the process exit code.

    A failure the user caused (an ``M3ViTError`` or an ``OSError``) becomes one ``error:`` line on stderr and
    exit code 2 (``M3VIT_DEBUG=1`` re-raises it); anything else is a bug and propagates with its traceback.
    Ctrl-C: exit 130; a closed output pipe (``| head``): exit 0, quietly."""
    try:
        return command()
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
