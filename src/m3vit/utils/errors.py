"""The error contract: every failure a user causes (a bad config, file, image, checkpoint or output
folder) raises an ``M3ViTError`` whose message says what to fix. The command line prints such an error
(and an ``OSError``) as one line and exits 2; anything else is a bug and shows its traceback.

The subclasses also derive from the built-in exception a Python caller would expect (``ValueError``
for bad values, ``OSError`` for outputs that cannot be written), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["M3ViTError", "ConfigError", "CheckpointError", "DataError", "InputError", "OutputError",
           "RunLockedError", "one_line"]


class M3ViTError(Exception):
    """A failure caused by the user's input; the message names what is wrong and how to fix it."""


class ConfigError(M3ViTError, ValueError):
    """A configuration value is unknown or out of range; the message names the key and what is allowed."""


class CheckpointError(M3ViTError, ValueError):
    """A checkpoint directory is missing, incomplete, damaged, or its weights do not match its config."""


class DataError(M3ViTError, ValueError):
    """A dataset, label or metrics file cannot be used as it is."""


class InputError(M3ViTError, ValueError):
    """An input given to a command or function (an image, a size, a task name) cannot be used."""


class OutputError(M3ViTError, OSError):
    """An output cannot be written where asked (it is not m3vit's to replace, or the disk is full)."""


class RunLockedError(OutputError):
    """Another m3vit process is using the same run or output folder."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (an ``OSError`` as ``path: reason``)."""
    if isinstance(exc, OSError) and not isinstance(exc, M3ViTError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        text = f"{where}: {exc.strerror}" if where is not None else exc.strerror
    else:
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__
