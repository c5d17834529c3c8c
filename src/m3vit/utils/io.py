"""Safe output: atomic files and folders, what m3vit may replace, folder locks, the umask.

The rules every command follows (the README's "Safety" section):

* A file is written to a temporary sibling ``.NAME.m3vit-tmp-XXXXXX`` and renamed into place, so no
  reader ever sees half a file; on any failure the temporary file (and nothing else) is removed.
* A folder output (a checkpoint, an export) is built in a temporary sibling folder and moved into
  place. An existing target is replaced only when it is an m3vit output of the same kind
  (``OutputKind.recognises``: for a checkpoint, a folder holding nothing but the files a checkpoint
  has); a user's folder, a plain file or an output of another kind is refused with one line.
* A single file the user names (``eval --out report.json``, ``data show --out samples.png``) replaces an
  existing file only when m3vit recognises it as its own of the same kind (``check_file_replaceable``: a
  JSON report's ``"format"``, a PNG's text tag); anything else is refused with one line.
* A folder that receives files from several runs (inference outputs, expert reports, experiment
  reports) keeps a manifest ``.m3vit-output.json`` of the files m3vit wrote there
  (``OutputFolder``): a file that is not listed, or that was changed after m3vit wrote it (its size or
  content is not the one recorded), is never overwritten. Each name is appended to a journal
  (``.m3vit-output.journal``) before its file is written, so a process killed mid-run leaves its files
  recognised; the journal is folded into the manifest when the folder is closed.
* Only the exact temporary names this process created are ever deleted; an old output is removed
  file by file (the names its kind knows), never with a recursive delete of whatever it holds.
* New files and folders get the permissions that ``open()`` and ``mkdir()`` would give them: 0666 /
  0777 minus the umask (``tempfile`` makes 0600 / 0700, which would hide a shared checkpoint); a file
  replaced keeps the permissions it had.
* A folder one process works in is locked (``FolderLock``: ``fcntl.flock`` on the folder) for as long
  as it works there; the kernel releases the lock when the process dies, even by SIGKILL.

Errors a user can fix (a folder that is not m3vit's, a locked folder, a full disk) are
``OutputError``s naming the user's path, never a temporary name.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError, RunLockedError

__all__ = ["current_umask", "write_atomic", "write_bytes", "write_text", "write_json", "write_report",
           "check_file_replaceable", "check_report_replaceable", "report_format", "OutputKind",
           "atomic_directory", "check_replaceable", "remove_output", "OutputFolder", "FolderLock", "MANIFEST_FILE",
           "TEMP_MARK", "is_temporary_name", "make_dirs", "exchange_paths"]

log = logging.getLogger(__name__)

#: What every temporary name m3vit creates contains (``.NAME.m3vit-tmp-XXXXXX``, ``.NAME.m3vit-old-XXXXXX``).
TEMP_MARK = ".m3vit-"
MANIFEST_FILE = ".m3vit-output.json"
_MANIFEST_FORMAT = "m3vit-output"
#: Names recorded while a folder is being written (one JSON line each), folded into the manifest at the end.
JOURNAL_FILE = ".m3vit-output.journal"
_JOURNAL_FORMAT = "m3vit-output-journal"


# ----------------------------------------------------------------------------------------------
# Permissions


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status`` on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic read-and-restore (not thread-safe, rare)
    os.umask(mask)
    return mask


def _follow_umask(path: str | os.PathLike, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` (the umask applies as usual); a plain file in the way is an ``OutputError``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path} exists and is not a folder; choose another output path") from None
    except OSError as exc:
        raise _output_error(path, exc) from None
    return path


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device; free some space or choose another location"
    return OutputError(f"cannot write {path}: {reason}")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` has the shape of a temporary name m3vit creates (``.X.m3vit-tmp-…``/``-old-…``)."""
    return name.startswith(".") and (f"{TEMP_MARK}tmp-" in name or f"{TEMP_MARK}old-" in name)


# ----------------------------------------------------------------------------------------------
# Files


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path`` (creating its folder).

    A new file gets the umask's permissions, a replaced one keeps its own. On any error the temporary file
    is removed and ``path`` is left as it was; an ``OSError`` (a full disk, no permission) becomes an
    ``OutputError`` naming ``path``, not the temporary name.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name to write")
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}tmp-", dir=path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        _take_mode(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _output_error(path, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def _take_mode(tmp: str, path: Path) -> None:
    """Give the temporary file ``tmp`` the permissions of the file ``path`` it replaces (a report made private
    stays private), or the umask's for a new file."""
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISREG(old.st_mode):
        os.chmod(tmp, stat.S_IMODE(old.st_mode))
    else:
        _follow_umask(tmp, directory=False)


def _unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``durable`` also flushes it to the disk before the rename
    (for checkpoints, which must survive a power cut whole)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    return write_atomic(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def check_file_replaceable(path: str | os.PathLike, recognises: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace an existing ``path`` unless it is a regular file m3vit recognises as its own
    (``recognises(path)``): an ``OutputError`` naming ``path`` and ``what`` m3vit writes there."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _output_error(path, exc) from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path} is a folder; give a file name to write")
    if not stat.S_ISREG(mode) or not recognises(path):
        raise OutputError(f"{path} exists and is not {what} written by m3vit; move it away or choose another name")


def report_format(path: str | os.PathLike) -> str | None:
    """The ``"format"`` of the JSON report in ``path`` (a JSON object's ``"format"`` string), else None."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON (JSONDecodeError is a ValueError)
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else None


def check_report_replaceable(path: str | os.PathLike, fmt: str) -> None:
    """``check_file_replaceable`` for a JSON report of format ``fmt``: call it before long work, so a
    refused ``--out`` fails at once."""
    check_file_replaceable(path, lambda p: report_format(p) == fmt, f"a JSON report ({fmt})")


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write a JSON ``report`` (a dict whose ``"format"`` names its kind, e.g. ``"m3vit-eval-report"``) to a
    file the user named, atomically; an existing file is replaced only when it is a report of the same
    format (``check_report_replaceable``)."""
    check_report_replaceable(path, report["format"])
    return write_json(path, report)


# ----------------------------------------------------------------------------------------------
# Folder outputs that are replaced whole (checkpoints, exports)


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder m3vit writes whole: its ``name`` (for messages), the ``files`` it may hold, and
    ``identify(folder) -> bool``, which says whether a folder's content is really this kind's (e.g. its
    config file carries m3vit's format marker). A folder is recognised when every entry is one of
    ``files`` and ``identify`` agrees."""

    name: str
    files: frozenset[str]
    identify: Callable[[Path], bool] = field(default=lambda folder: True, compare=False)

    def foreign_entries(self, folder: Path) -> list[str]:
        """The entries of ``folder`` this kind does not write (sorted)."""
        return sorted(p.name for p in folder.iterdir() if p.name not in self.files or p.is_dir())

    def holds_only_its_files(self, folder: Path) -> bool:
        """Whether every entry of ``folder`` is a plain file of this kind (some may be missing and ``identify``
        is not asked: a folder being written, or half deleted, by m3vit)."""
        return not self.foreign_entries(folder) and not any(p.is_symlink() for p in folder.iterdir())

    def recognises(self, folder: str | os.PathLike) -> bool:
        folder = Path(folder)
        try:  # a link is never recognised: what it points to is not the output's to replace
            return (folder.is_dir() and not folder.is_symlink() and not self.foreign_entries(folder)
                    and self.identify(folder))
        except OSError:
            return False


def check_replaceable(path: Path, kind: OutputKind) -> None:
    """Raise ``OutputError`` unless ``path`` is absent, an empty folder or a recognised ``kind`` output."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; m3vit writes a {kind.name} folder there only "
                          f"if the path is free: choose another output path or move the file")
    if not any(path.iterdir()):
        return
    if not kind.recognises(path):
        foreign = kind.foreign_entries(path)
        held = f" (it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})" if foreign else ""
        raise OutputError(f"{path} exists and is not an m3vit {kind.name}{held}; m3vit replaces only its own "
                          f"outputs: choose a new output path or empty that folder")


def remove_output(path: str | os.PathLike, kind: OutputKind) -> list[str]:
    """Delete the files of ``kind`` in the folder ``path``, then the folder if it is empty.

    Returns the entries left behind (anything ``kind`` does not write, never deleted). What another m3vit
    process removes meanwhile (two sweeping the same stale folder) is no error.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a link; m3vit removes only folders of its own, never what a link points to")
    for name in kind.files:
        entry = path / name
        if entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
    try:
        left = sorted(p.name for p in path.iterdir())
        if not left:
            path.rmdir()
    except FileNotFoundError:
        return []
    return left


_RENAME_EXCHANGE = 2  # renameat2's flag (linux/fs.h)
_AT_FDCWD = -100


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``), so no reader or crash ever finds ``b`` missing. Returns False where the system or
    the file system cannot (then nothing changed); other failures raise ``OSError``."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # no C library to load symbols from: no atomic exchange
        return None


class atomic_directory:
    """Build a folder output of ``kind`` in a temporary sibling; on success it replaces ``path``.

    ``with atomic_directory(path, kind) as tmp: ...`` writes into ``tmp``. Before anything is written,
    ``path`` must be free, an empty folder, or a folder ``kind`` recognises (else ``OutputError``); it is
    checked again before the swap. The new output and the old one are swapped in one atomic step
    (``exchange_paths``; where the system cannot, the old one is moved aside under a temporary name and the
    new one renamed into place), then the old one's files are deleted by name. On an exception only the
    temporary folder this call created is removed. The new folder and its files follow the umask.
    """

    def __init__(self, path: str | os.PathLike, kind: OutputKind):
        self.path = Path(path)
        self.kind = kind

    def __enter__(self) -> Path:
        check_replaceable(self.path, self.kind)
        make_dirs(self.path.parent)
        self._sweep_stale()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}{TEMP_MARK}tmp-", dir=self.path.parent))
        except OSError as exc:
            raise _output_error(self.path, exc) from None
        # Locked while this process builds it: a later call for the same path knows it is not stale.
        self._lock = FolderLock(self.tmp).acquire()
        _follow_umask(self.tmp, directory=True)
        return self.tmp

    def _sweep_stale(self) -> None:
        """Remove what a killed earlier call for this path left: its temporary folders (``.NAME.m3vit-tmp-…``,
        and ``.NAME.m3vit-old-…`` once NAME exists again) that no process holds locked and that hold nothing
        but this kind's files, deleted by name; anything else there stays."""
        prefixes = [f".{self.path.name}{TEMP_MARK}tmp-"]
        if os.path.lexists(self.path):
            prefixes.append(f".{self.path.name}{TEMP_MARK}old-")
        for entry in self.path.parent.iterdir():
            if not entry.name.startswith(tuple(prefixes)) or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                lock = FolderLock(entry, create=False).acquire()
            except (RunLockedError, OutputError):  # being built by another process, or gone meanwhile
                continue
            try:
                if self.kind.holds_only_its_files(entry):
                    remove_output(entry, self.kind)
                    log.info("removed %s, left by an interrupted m3vit process", entry)
            finally:
                lock.release()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._finish(exc_type, exc)
        finally:
            self._lock.release()

    def _finish(self, exc_type, exc) -> bool:
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OutputError):  # raised by a write inside: name the user's path, not ours
                raise OutputError(str(exc).replace(str(self.tmp), str(self.path))) from None
            if isinstance(exc, OSError):
                raise _output_error(self.path, exc) from None
            return False
        old = None
        try:
            for entry in self.tmp.iterdir():
                if entry.is_file():
                    _follow_umask(entry, directory=False)
            check_replaceable(self.path, self.kind)
            if not os.path.lexists(self.path):
                os.replace(self.tmp, self.path)
            elif exchange_paths(self.tmp, self.path):  # one atomic swap: the old output now sits at tmp
                old = self.tmp
            else:  # two renames: a crash between them leaves the output only under the temporary names
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}{TEMP_MARK}old-", dir=self.path.parent))
                os.replace(self.path, old)  # an empty folder or a recognised output (checked just above)
                os.replace(self.tmp, self.path)
        except OutputError:
            self._discard()
            raise
        except OSError as exc:
            self._discard()
            raise _output_error(self.path, exc) from None
        if old is not None:
            left = remove_output(old, self.kind)
            if left:  # cannot happen for a recognised folder unless something wrote into it meanwhile
                log.warning("kept %s: it holds %s, which m3vit did not write", old, ", ".join(left))
        return False

    def _discard(self) -> None:
        """Remove the temporary folder this call made (everything in it was written by this call)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Locks


class FolderLock:
    """An exclusive lock on a folder (``fcntl.flock`` on the folder itself), held until ``release``.

    A second process asking for it gets a ``RunLockedError`` naming the folder. The kernel drops the
    lock when the holding process ends in any way (SIGKILL included), and no lock file is left behind.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder", create: bool = True):
        self.folder = Path(folder)
        self.what = what
        self.create = create  # make the folder when it does not exist (else: OutputError)
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        if self.create:
            make_dirs(self.folder)
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise _output_error(self.folder, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{self.folder} is in use by another m3vit process; wait for it to finish or "
                                 f"choose another {self.what}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# Folders that collect files from several runs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputFolder:
    """A folder m3vit writes files into, with a manifest of what it wrote (see the module docstring).

    ``with OutputFolder(path, kind) as out:`` locks the folder; ``out.claim(names)`` checks before any
    work that each name is free or was written by m3vit (else ``OutputError`` naming the first file
    that is the user's); ``out.path(name)`` is where to write (atomically, e.g. ``write_json``) and records
    the name in the journal at once (so files written before a crash or a kill stay replaceable); the
    manifest is written, and the journal removed, when the block ends, also after an error. ``kind`` is
    recorded; a folder holding another kind's manifest or journal is refused.
    """

    def __init__(self, folder: str | os.PathLike, kind: str):
        self.folder = Path(folder)
        self.kind = kind
        self._lock = FolderLock(self.folder, what="output folder")
        self._files: set[str] = set()
        # (size, mtime_ns, sha256) of each file when the last run ended, and the names this run has written.
        self._stamps: dict[str, tuple[int, int, str]] = {}
        self._written: set[str] = set()

    def __enter__(self) -> "OutputFolder":
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise OutputError(f"{self.folder} exists and is not a folder; choose another output folder")
        self._created = not self.folder.exists()
        self._lock.acquire()
        try:
            self._files = self._read_manifest()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._files:
                write_json(self.folder / MANIFEST_FILE, {"format": _MANIFEST_FORMAT, "kind": self.kind,
                                                        "files": sorted(self._files),
                                                        "stamps": self._current_stamps()})
                try:
                    os.unlink(self.folder / JOURNAL_FILE)  # folded into the manifest just written
                except FileNotFoundError:
                    pass
        finally:
            self._lock.release()
        if self._created and not self._files:  # nothing was written: leave no trace of the attempt
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something else was put there meanwhile: keep it

    def _read_manifest(self) -> set[str]:
        return self._read_manifest_file() | self._read_journal()

    def _refuse_kind(self, kind: Any) -> None:
        if kind != self.kind:
            raise OutputError(f"{self.folder} holds m3vit {kind} outputs, not {self.kind} outputs; "
                              f"choose another output folder")

    def _read_journal(self) -> set[str]:
        """The names a run recorded before it ended without writing the manifest (killed, crashed)."""
        path = self.folder / JOURNAL_FILE
        if not os.path.lexists(path):
            return set()
        damaged = OutputError(f"{path} is damaged; m3vit cannot tell which files in {self.folder} it wrote: "
                              f"choose another output folder")
        if not path.is_file() or path.is_symlink():
            raise damaged
        # A last line without its newline was torn by the kill: its file was not written yet. Without a
        # whole line (the header itself torn, or nothing written: a full disk) nothing was recorded.
        lines = path.read_bytes().split(b"\n")[:-1]
        if not lines:
            return set()
        try:
            header = json.loads(lines[0]) if lines else None
            names = [json.loads(line) for line in lines[1:]]
        except (ValueError, UnicodeDecodeError):
            raise damaged from None
        if not isinstance(header, dict) or header.get("format") != _JOURNAL_FORMAT:
            raise damaged
        if not all(isinstance(n, str) for n in names):
            raise damaged
        self._refuse_kind(header.get("kind"))
        return set(names)

    def _record(self, name: str) -> None:
        """Append ``name`` to the journal (created with its header on first use), before its file exists."""
        path = self.folder / JOURNAL_FILE
        new = not path.exists()
        lines = [json.dumps({"format": _JOURNAL_FORMAT, "kind": self.kind})] if new else []
        lines.append(json.dumps(name))
        data = ("\n".join(lines) + "\n").encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:
            if new:  # the journal this call created records nothing whole: leave no trace of it
                _unlink_quietly(path)
            raise _output_error(path, exc) from None

    def _read_manifest_file(self) -> set[str]:
        path = self.folder / MANIFEST_FILE
        if not os.path.lexists(path):
            return set()
        try:
            data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
            ok = data.get("format") == _MANIFEST_FORMAT and isinstance(data.get("files"), list)
        except (ValueError, UnicodeDecodeError, AttributeError):
            ok = False
        if not ok:
            raise OutputError(f"{path} is damaged; m3vit cannot tell which files in {self.folder} it wrote: "
                              f"choose another output folder")
        self._refuse_kind(data.get("kind"))
        stamps = data.get("stamps")  # absent in manifests of m3vit before the stamps
        if isinstance(stamps, dict):
            self._stamps = {str(k): (v[0], v[1], v[2]) for k, v in stamps.items()
                            if isinstance(v, list) and len(v) == 3 and isinstance(v[0], int) and isinstance(v[1], int)
                            and isinstance(v[2], str)}
        return {str(f) for f in data["files"]}

    def _current_stamps(self) -> dict[str, list]:
        """``[size, mtime_ns, sha256]`` of every file this run wrote, and the earlier stamps of the others (a
        file the user changed since keeps the stamp that tells it): what a later run checks them against."""
        stamps = {name: list(stamp) for name, stamp in self._stamps.items()
                  if name in self._files and name not in self._written}
        for name in sorted(self._written):
            try:
                st = os.lstat(self.folder / name)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                stamps[name] = [st.st_size, st.st_mtime_ns, _sha256(self.folder / name)]
        return stamps

    def _changed_since_written(self, name: str) -> bool:
        """Whether the listed file ``name`` was changed (or replaced) after m3vit last wrote it: its size or
        content is not the one the manifest recorded (the content is hashed only when the modification time
        moved: a copy of the folder is still recognised). A name this run wrote, or one recorded without a
        stamp (a killed run's journal, an older manifest), is not checked."""
        stamp = self._stamps.get(name)
        if stamp is None or name in self._written:
            return False
        try:
            st = os.lstat(self.folder / name)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != stamp[0]:
            return True
        return st.st_mtime_ns != stamp[1] and _sha256(self.folder / name) != stamp[2]

    def owns(self, name: str) -> bool:
        return name in self._files

    def claim(self, names: Iterable[str]) -> None:
        """Refuse (``OutputError``) if any of ``names`` exists in the folder and m3vit did not write it."""
        for name in names:
            target = self.folder / name
            if os.path.lexists(target) and name not in self._files:
                raise OutputError(f"{target} exists and was not written by m3vit; it is never overwritten: "
                                  f"choose another output folder or move that file")
            if self._changed_since_written(name):
                raise OutputError(f"{target} was changed after m3vit wrote it; it is never overwritten: "
                                  f"choose another output folder or move that file")
            if target.is_dir():
                raise OutputError(f"{target} is a folder; choose another output folder")

    def path(self, name: str) -> Path:
        """The path to write ``name`` to (relative, ``/``-separated); recorded in the manifest."""
        self.claim([name])
        if name not in self._files:
            self._record(name)
            self._files.add(name)
        self._written.add(name)
        return self.folder / name
