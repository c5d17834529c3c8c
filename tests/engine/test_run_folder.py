"""``engine.run_folder`` on its own: the log, the claim of a folder, where step checkpoints live, and which
names the cleanup of an interrupted run may delete. (Whole runs in a run folder: test_trainer, test_resume,
test_safety.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.engine.config import RunConfig
from m3vit.engine.run_folder import (_TEMPORARY, CHECKPOINTS, LOG_FILE, RUN_CONFIG, RunDirectoryError,
                                     append_log, claim_run_folder, prepare_run_folder, read_log, step_checkpoint_path,
                                     step_checkpoints, truncate_log)
from m3vit.utils.errors import RunLockedError


def test_truncate_log_keeps_the_steps_up_to_the_resume_step_and_drops_a_torn_line(tmp_path):
    log = tmp_path / LOG_FILE
    for step in (1, 2, 3, 4):
        append_log(log, {"step": step, "loss": 1.0 / step})
    append_log(log, {"step": 2, "eval": {"semseg": {"mIoU": 0.5}}})
    with open(log, "a") as f:
        f.write('{"step": 5, "lo')  # a killed run's last line
    truncate_log(log, 2)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and "eval" in records[-1]


def test_truncate_log_creates_an_absent_log(tmp_path):
    truncate_log(tmp_path / LOG_FILE, 0)
    assert (tmp_path / LOG_FILE).read_text() == ""


def test_a_claim_holds_the_lock_and_a_refused_check_releases_it(tmp_path):
    out, cfg = tmp_path / "run", RunConfig()
    with claim_run_folder(out, cfg, resume=False) as checkpoint:
        assert checkpoint is None
        with pytest.raises(RunLockedError, match="in use by another m3vit process"):
            with claim_run_folder(out, cfg, resume=False):
                pass
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RunDirectoryError, match="not empty"):
        with claim_run_folder(out, cfg, resume=False):
            pass
    (out / "notes.txt").unlink()
    with claim_run_folder(out, cfg, resume=False):  # released after the refusal: claimable again
        pass


def test_prepare_writes_the_run_config_and_removes_only_temporaries(tmp_path):
    out = tmp_path / "run"
    (out / CHECKPOINTS).mkdir(parents=True)
    (out / CHECKPOINTS / ".step-4.m3vit-tmp-abc123").mkdir()
    (out / ".config.yaml.m3vit-tmp-x1").write_text("half")
    (out / ".notes").write_text("the user's")
    prepare_run_folder(out, RunConfig())
    assert RunConfig.from_dict(yaml.safe_load((out / RUN_CONFIG).read_text())) == RunConfig()
    assert sorted(p.name for p in out.iterdir()) == [".notes", CHECKPOINTS, RUN_CONFIG]
    assert not any((out / CHECKPOINTS).iterdir())


def test_step_checkpoints_are_listed_by_step(tmp_path):
    assert step_checkpoints(tmp_path) == []
    for step in (10, 2, 33):
        step_checkpoint_path(tmp_path, step).mkdir(parents=True)
    assert step_checkpoint_path(tmp_path, 12) == tmp_path / CHECKPOINTS / "step-12"
    (tmp_path / CHECKPOINTS / ".step-40.m3vit-tmp-ab").mkdir()  # an interrupted save
    (tmp_path / CHECKPOINTS / "step-50").write_text("a file, not a checkpoint")
    (tmp_path / CHECKPOINTS / "step-7b").mkdir()
    assert step_checkpoints(tmp_path) == [(s, step_checkpoint_path(tmp_path, s)) for s in (2, 10, 33)]


@pytest.mark.parametrize("name", [
    ".step-3.m3vit-tmp-a1B2_c", ".step-3.m3vit-old-77", ".final.m3vit-tmp-q", ".config.yaml.m3vit-tmp-z",
    ".log.jsonl.m3vit-old-1", ".step-10.tmp-k3", ".step-2.old-4", ".final.deleting-99", ".config.yaml.ab12CD_9.tmp",
])
def test_temporary_names_of_the_trainer_are_recognised(name):
    assert _TEMPORARY.match(name)


@pytest.mark.parametrize("name", [".config.yaml.tmp-backup", ".log.jsonl.old-3", ".config.yaml.deleting-1",
                                  ".step-3.tmp-", ".final.old-x", ".step-3"])
def test_old_folder_suffixes_apply_to_checkpoint_folders_only(name):
    # m3vit 0.1 used .tmp-/.old-/.deleting- for checkpoint folders, never for the run's files: a user's
    # ".config.yaml.tmp-backup" is not one of them and is never cleaned up.
    assert not _TEMPORARY.match(name)


@given(st.text(alphabet="abcdefgjklmnopqrstuvwxyz.-_0123456789", max_size=24))
def test_names_of_the_user_are_never_temporaries(name):
    # A user's file becomes a temporary only if it has the exact shape of one of the trainer's own names.
    own = (".step-", ".final.", ".config.yaml.", ".log.jsonl.")
    if _TEMPORARY.match(name):
        assert name.startswith(own)
    for user in (name, f"{name}.notes", f"step-1{name}", f".git{name}"):
        if not user.startswith(own):
            assert not _TEMPORARY.match(user)


def test_truncate_log_refuses_a_file_that_is_not_a_log(tmp_path):
    log = tmp_path / LOG_FILE
    log.write_text('{"step": 1}\nmy notes\n')
    with pytest.raises(RunDirectoryError, match="not this run's log"):
        truncate_log(log, 1)
    assert log.read_text() == '{"step": 1}\nmy notes\n'


_records = st.lists(st.fixed_dictionaries({"step": st.integers(0, 10**6)},
                                          optional={"loss": st.floats(allow_nan=False, allow_infinity=False),
                                                    "eval": st.dictionaries(st.text(max_size=5), st.floats(0, 1))}),
                    max_size=6)


@settings(max_examples=60, deadline=None)
@given(records=_records, torn=st.integers(0, 40))
def test_read_log_reads_back_what_append_log_wrote_whatever_the_torn_tail(records, torn):
    """Every record the trainer appended reads back; a killed run's half-written last record is left out."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / LOG_FILE
        for record in records:
            append_log(log, record)
        with open(log, "a") as f:
            f.write(json.dumps({"step": 7, "loss": 0.25})[:torn])
        assert read_log(log) == records
