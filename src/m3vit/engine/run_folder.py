"""The run folder of a training run: its layout and file names, the check before a run starts (one run per
folder, resume rules), the step checkpoints (verify, find the newest resumable, prune) and the cleanup of what
an interrupted run left, and ``remove_run_folder``. The training loop itself is ``engine.trainer``.

Layout of a run folder ``OUT``::

    OUT/config.yaml              the resolved run config (RUN_CONFIG)
    OUT/log.jsonl                one JSON object per line (LOG_FILE): train logs {"step", "epoch", "lr", "loss",
                                 "loss/<task>", "aux", "images_per_s", "time"} (means over the
                                 ``log_every`` steps before ``step``; "time" is seconds of training
                                 so far) and periodic evals {"step", "eval": {task: {metric: v}}}
    OUT/checkpoints/step-N/      model.safetensors + config.yaml (with "run" and "step") + trainer.pt
    OUT/final/                   the trained model: model.safetensors + config.yaml (with "run", "step")
    OUT/tensorboard/             TensorBoard event files (when the tensorboard package is installed)

A step checkpoint exists only whole (written into a temporary folder renamed when complete); the
temporary names of an interrupted save or prune (``_TEMPORARY``) are removed when a run starts and by
``remove_run_folder``, and nothing else m3vit did not write is ever deleted.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models.checkpoint import CHECKPOINT, TRAINER_STATE, torch_load_failure, verify_checkpoint
from ..models.config import ConfigError
from ..utils.errors import CheckpointError, M3ViTError, one_line
from ..utils.io import FolderLock, remove_output, write_text
from .config import RunConfig

__all__ = ["RUN_CONFIG", "LOG_FILE", "CHECKPOINTS", "FINAL", "TENSORBOARD", "RESUMABLE_KEYS", "TRAINER_STATE_KEYS",
           "RunDirectoryError", "claim_run_folder", "check_run_folder", "config_differences", "prepare_run_folder",
           "read_log", "truncate_log", "append_log", "step_checkpoint_path", "step_checkpoints",
           "verify_step_checkpoint", "latest_checkpoint", "prune_checkpoints", "remove_run_folder"]

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
RUN_CONFIG = "config.yaml"
#: Folders of a run folder: the step checkpoints, the trained model, the TensorBoard event files.
CHECKPOINTS, FINAL, TENSORBOARD = "checkpoints", "final", "tensorboard"
# Keys a resumed run may change; anything else must match OUT/config.yaml.
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.epochs", "train.progress", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints", "data.num_workers",
})
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What trainer.pt must hold for a resume (see _Trainer._trainer_state).
TRAINER_STATE_KEYS = ("step", "epoch", "position", "global_batch", "elapsed", "optimizer", "scheduler", "scaler",
                      "rng", "cross_task_head")


class RunDirectoryError(M3ViTError, ValueError):
    """The output directory cannot be used as asked (not empty without resume, config changed ...)."""


# ----------------------------------------------------------------------------------------------
# Before a run: claim and check the folder, then prepare it.


@contextmanager
def claim_run_folder(out: Path, cfg: RunConfig, resume: bool, *, lock: bool = True) -> Iterator[Path | None]:
    """Hold ``out`` for the run of ``cfg`` for the ``with`` block and yield the step checkpoint to resume from
    (None: start from step 0), after ``check_run_folder``. With ``lock`` (the main process of a run) the folder
    is locked (``FolderLock``: one run per folder; released when the block ends, or by the kernel when the
    process dies), and a folder it created is removed again when the block fails with it still empty; the
    other processes of a distributed run only check it."""
    created = not os.path.lexists(out)
    try:
        with FolderLock(out, what="--out") if lock else nullcontext():
            yield check_run_folder(out, cfg, resume)
    except BaseException:
        if created and lock:  # a run that failed before writing anything leaves no empty folder behind
            try:
                out.rmdir()
            except OSError:
                pass  # it holds what the run wrote (or another process made it meanwhile): keep it
        raise


def check_run_folder(out: Path, cfg: RunConfig, resume: bool) -> Path | None:
    """Validate ``out`` for this run; returns the checkpoint to resume from (or None).

    Without ``resume`` the folder must be empty or absent; with it, its ``config.yaml`` must be the run's
    but for ``RESUMABLE_KEYS``, and the checkpoint is ``latest_checkpoint`` (None: start from scratch)."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {str(out)!r} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not resume:
        if entries:
            raise RunDirectoryError(f"output directory {str(out)!r} is not empty; pass --resume to continue "
                                    f"the run in it, or choose a new --out")
        return None
    if not entries:
        log.warning("--resume: %s is empty; starting from scratch", out)
        return None
    saved_path = out / RUN_CONFIG
    if not saved_path.is_file():
        raise RunDirectoryError(f"--resume: {str(out)!r} is not a run directory ({RUN_CONFIG} is missing)")
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except yaml.YAMLError:
        raise RunDirectoryError(f"--resume: {saved_path} is not valid YAML") from None
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"--resume: {saved_path} is not a run config")
    if not _is_trainer_config(saved_path):  # the resume rewrites it: never a config written by hand
        raise RunDirectoryError(f"--resume: {saved_path} is not the run config m3vit train wrote there (a resume "
                                f"rewrites it); move it out of {str(out)!r} or choose another --out")
    try:  # keys added since the run was written take their defaults, which keep the earlier behaviour
        saved = RunConfig.from_dict(saved, source=str(saved_path)).to_dict()
    except ConfigError:
        pass  # compared as written: the differences name what changed
    changed = [d for d in config_differences(saved, cfg.to_dict()) if d[0] not in RESUMABLE_KEYS]
    if changed:
        key, before, after = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise RunDirectoryError(
            f"--resume: {key} differs from the run's {saved_path} ({before!r} there, {after!r} now){more}; "
            f"a resumed run may only change {', '.join(sorted(RESUMABLE_KEYS))}")
    if read_log(out / LOG_FILE) is None:  # the resume rewrites the log: never a file of the user's
        raise RunDirectoryError(f"--resume: {out / LOG_FILE} is not the run's log (not one JSON record with a "
                                f"step per line); move it out of {str(out)!r}")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", out / CHECKPOINTS)
    return checkpoint


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value)]`` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append((dotted, a, b))
    return out


def prepare_run_folder(out: Path, cfg: RunConfig) -> None:
    """Create ``out``, remove what an interrupted run left (``_TEMPORARY`` names) and write the run config."""
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out / CHECKPOINTS)
    _clean_temporaries(out)
    write_text(out / RUN_CONFIG, cfg.to_yaml())


# ----------------------------------------------------------------------------------------------
# The log.


def read_log(path: str | os.PathLike) -> list[dict] | None:
    """The records of a run's log ``path`` (training and evaluation lines, in order), or None when the file is
    not a log the trainer wrote: every complete line must be a JSON object with an integer ``"step"`` (or be
    blank); only a last line without its newline (a killed run's torn write) may be cut short, and it is left
    out. A log that does not exist reads as no records."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        return None
    *lines, torn = text.split("\n")
    if torn and not torn.startswith("{"):
        return None
    records = []
    for line in lines:
        if not line.strip():  # a blank line (an editor's) is no record
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            return None
        records.append(record)
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (and drop a torn last line of a killed run); a log that does not
    exist yet is created empty. A file there that is not the trainer's log (``read_log``) raises
    ``RunDirectoryError`` (``check_run_folder`` refuses a resume on it first)."""
    records = read_log(path)
    if records is None:
        raise RunDirectoryError(f"{path} is not this run's log (not one JSON record with a step per line); "
                                f"move it out of the run folder")
    write_text(path, "".join(f"{json.dumps(record)}\n" for record in records if record["step"] <= step))


def append_log(path: Path, record: dict) -> None:
    """Append one record to a run's log (one JSON object per line), flushed."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ----------------------------------------------------------------------------------------------
# Step checkpoints: where they live, which one a resume continues from, pruning.


def step_checkpoint_path(out: Path, step: int) -> Path:
    """Where the step checkpoint of ``step`` lives: ``OUT/checkpoints/step-N``."""
    return out / CHECKPOINTS / f"step-{step}"


def verify_step_checkpoint(path: str | os.PathLike) -> None:
    """Check that ``OUT/checkpoints/step-N`` can be resumed from; raises ``CheckpointError`` saying why not.

    Its model checkpoint must verify (``verify_checkpoint``: config, header, sizes, config against weights;
    the tensors are not read), its ``config.yaml`` step (when recorded) must be N, and ``trainer.pt`` must
    load with ``weights_only=True`` (memory-mapped: its tensors are not read) and hold every key a resume
    needs with ``step`` equal to N.
    """
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a step checkpoint (expected a folder named step-N)")
    step = int(match.group(1))
    try:
        verified = verify_checkpoint(path)
    except FileNotFoundError as exc:
        raise CheckpointError(one_line(exc)) from None
    recorded = verified.meta.get("step")
    if recorded is not None and recorded != step:
        raise CheckpointError(f"{verified.config_path}: records step {recorded!r}, not {step}")
    state_path = path / TRAINER_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # torch.load's failures
        reason = (exc.strerror or "cannot be read") if isinstance(exc, OSError) else torch_load_failure(state_path, exc)
        raise CheckpointError(f"{state_path}: damaged or truncated ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in TRAINER_STATE_KEYS):
        missing = [k for k in TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{state_path}: not a trainer state (missing {missing[:3]})")
    if not (isinstance(state["step"], int) and state["step"] == step):
        raise CheckpointError(f"{state_path}: holds step {state['step']!r}, not {step}")


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest ``OUT/checkpoints/step-N`` that verifies (``verify_step_checkpoint``), or None when there is none.

    Newer ones that do not verify (a truncated ``trainer.pt`` or weights) are skipped, with one warning each
    saying why; when step checkpoints exist but none verifies, one ``CheckpointError`` says so and why the
    newest failed (no warnings). Hidden temporary directories (an interrupted save or prune) are not step
    checkpoints.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    skipped: list[tuple[Path, CheckpointError]] = []
    for _, path in reversed(_step_dirs(root)):
        try:
            verify_step_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, exc))
            continue
        for bad, exc in skipped:
            log.warning("skipping checkpoint %s, newer than %s: %s", bad.name, path.name, one_line(exc))
        return path
    if skipped:
        names = ", ".join(p.name for p, _ in skipped)
        raise CheckpointError(f"none of the checkpoints in {root} can be resumed from ({names}; move them away to "
                              f"start over); the newest failed with: {one_line(skipped[0][1])}")
    return None


def step_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of every ``OUT/checkpoints/step-N`` folder, by step (complete or not: see
    ``verify_step_checkpoint``); empty without a checkpoints folder."""
    root = Path(out) / CHECKPOINTS
    return _step_dirs(root) if root.is_dir() else []


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """The ``step-N`` folders of ``root`` by step; a link named so is not one (never resumed from or pruned)."""
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink())


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints of run folder ``out``, file by file
    (``remove_output``); a step folder that holds anything a checkpoint does not is left alone."""
    for _, path in _step_dirs(out / CHECKPOINTS)[:-keep]:
        if not CHECKPOINT.recognises(path):
            log.warning("not pruning %s: it holds files m3vit did not write", path)
            continue
        doomed = path.with_name(f".{path.name}.m3vit-old-{os.getpid()}")  # never a half-deleted step-N
        os.replace(path, doomed)
        remove_output(doomed, CHECKPOINT)


# ----------------------------------------------------------------------------------------------
# Cleaning up: an interrupted run's temporaries, a whole run folder.


# The temporary names the trainer (and the checkpoint writer under it) creates in a run folder and in
# its checkpoints/ folder, today's and those of earlier m3vit versions: only these are cleaned up.
_OWN_DIRS = rf"(?:step-\d+|{re.escape(FINAL)})"
_OWN_NAMES = rf"(?:step-\d+|{re.escape(FINAL)}|{re.escape(RUN_CONFIG)}|{re.escape(LOG_FILE)})"
_TEMPORARY = re.compile(
    rf"^\.(?:{_OWN_NAMES}\.m3vit-(?:tmp|old)-[A-Za-z0-9_]+"         # m3vit.utils.io
    rf"|{_OWN_DIRS}(?:\.tmp-[A-Za-z0-9_]+|\.old-\d+|\.deleting-\d+)"  # m3vit 0.1 checkpoint folders
    rf"|{_OWN_NAMES}\.[A-Za-z0-9_]{{8}}\.tmp)$")                       # m3vit 0.1 files (mkstemp)


def _clean_temporaries(root: Path) -> None:
    """Remove what an interrupted save or prune left in ``root``: exactly the temporary names the trainer
    creates (``_TEMPORARY``), nothing else (a user's ``.git`` or ``.notes`` stays). A temporary folder goes
    only while it holds nothing but a checkpoint's files, deleted by name; one holding anything else, or a
    link, is kept with a warning."""
    if not root.is_dir() or root.is_symlink():
        return
    for path in root.iterdir():
        if not _TEMPORARY.match(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            if CHECKPOINT.holds_only_its_files(path):
                remove_output(path, CHECKPOINT)
            else:
                log.warning("kept %s: it holds files m3vit did not write", path)
        else:
            path.unlink()


def _is_trainer_config(path: Path) -> bool:
    """Whether ``path`` is the run config ``m3vit train`` wrote (``RunConfig.to_yaml``): a YAML mapping of a
    run's sections whose text is exactly that dump of what it holds. A config written or edited by hand
    (comments, another layout) is the user's, and is never deleted or rewritten."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        text = path.read_text()
        saved = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return (isinstance(saved, dict) and "train" in saved and set(saved) <= {"model", "data", "train", "eval"}
            and yaml.safe_dump(saved, sort_keys=False) == text)


_EVENT_PREFIX = "events.out.tfevents."


def _is_own_entry(path: Path) -> bool:
    """Whether the entry ``path`` of a run folder whose config is the trainer's holds only what the trainer
    writes (a link never does: it is not followed)."""
    name = path.name
    if path.is_symlink():
        return False
    if _TEMPORARY.match(name):
        return not path.is_dir() or CHECKPOINT.holds_only_its_files(path)
    if name == RUN_CONFIG:
        return True
    if name == LOG_FILE:
        return path.is_file() and read_log(path) is not None
    if name == FINAL:
        return CHECKPOINT.recognises(path)
    if name == CHECKPOINTS:
        return path.is_dir() and all(
            not p.is_symlink() and (CHECKPOINT.recognises(p) if _STEP_DIR.match(p.name) else
                                    bool(_TEMPORARY.match(p.name)) and _is_own_entry(p))
            for p in path.iterdir())
    if name == TENSORBOARD:
        return path.is_dir() and all(p.is_file() and not p.is_symlink() and p.name.startswith(_EVENT_PREFIX)
                                     for p in path.iterdir())
    return False


def _foreign_entries(out: Path) -> list[str]:
    """The entries of run folder ``out`` (sorted names) that hold anything the trainer did not write: all of
    them unless its ``config.yaml`` is the trainer's (``_is_trainer_config``)."""
    entries = sorted(out.iterdir())
    if entries and not _is_trainer_config(out / RUN_CONFIG):
        return [p.name for p in entries]
    return [p.name for p in entries if not _is_own_entry(p)]


def remove_run_folder(out: str | os.PathLike) -> list[str]:
    """Delete a training run folder (config, log, step checkpoints, ``final/``, TensorBoard event files and
    the trainer's temporary names, then the folder), holding its lock (``RunLockedError`` while a run uses
    it), only when all of it is the trainer's: a file or link of the user's anywhere in it (a ``config.yaml``
    or ``log.jsonl`` m3vit did not write included, recognised by content) leaves everything as it was.
    Returns the top-level entries holding what is not the trainer's (empty: the folder is gone)."""
    out = Path(out)
    if not out.is_dir():
        return []
    with FolderLock(out, what="--out"):
        foreign = _foreign_entries(out)
        if foreign:
            return foreign
        for sub in (out / CHECKPOINTS, out):
            _clean_temporaries(sub)
        for _, path in step_checkpoints(out):
            remove_output(path, CHECKPOINT)
        if (out / FINAL).is_dir():
            remove_output(out / FINAL, CHECKPOINT)
        for event in (out / TENSORBOARD).glob(f"{_EVENT_PREFIX}*"):  # by name, like everything deleted here
            event.unlink()
        for name in (RUN_CONFIG, LOG_FILE):
            (out / name).unlink(missing_ok=True)
        for folder in (out / CHECKPOINTS, out / TENSORBOARD, out):
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # something was put there meanwhile: it stays, and is named
                return sorted(p.name for p in out.iterdir())
    return []
