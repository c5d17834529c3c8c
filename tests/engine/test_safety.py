"""Nothing the user owns is lost: outputs never replace what m3vit did not write, one run per folder,
a resume cleans up only its own temporary names, permissions follow the umask, a full disk is one line.

Every test here reproduces a defect of m3vit 0.1 (which deleted folders given as --out, cleaned every
dot-folder of a run, let two runs share a folder and wrote 0600/0700 checkpoints)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid

import pytest
import torch

import m3vit
from m3vit.cli import main
from m3vit.engine.config import load_config
from m3vit.engine.run_folder import latest_checkpoint
from m3vit.engine.trainer import train
from m3vit.experiments.demo import start_fresh
from m3vit.models import create_model, save_checkpoint
from m3vit.utils.errors import OutputError

MODEL = dict(embed_dim=32, depth=2, num_heads=2, moe_blocks=[1], num_experts=4, top_k=2, head_channels=8)
TASKS = {"semseg": 4, "sal": 1}


def _tiny_model():
    torch.manual_seed(0)
    return create_model("m3vit_micro", TASKS, img_size=(32, 32), **MODEL)


@pytest.fixture
def source(tmp_path):
    """A small MoE checkpoint with a run config (sal and semseg on 32x32 synthetic scenes)."""
    cfg = load_config(None, {"model.name": "m3vit_micro", "data.size": [32, 32], "data.val_length": 4,
                             "data.tasks": list(TASKS), "eval.batch_size": 4, "eval.edge_thresholds": 3,
                             **{f"model.{k}": v for k, v in MODEL.items()}})
    return save_checkpoint(_tiny_model(), tmp_path / "ckpt", extra={"run": cfg.to_dict(), "step": 1})


def _user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "data.csv").write_text("1,2,3")
    return path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "m3vit-tmp" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# 1. Outputs never replace what m3vit did not create


def test_export_refuses_a_user_folder_a_plain_file_and_its_own_source(source, tmp_path, capsys):
    user = _user_folder(tmp_path / "mine")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    before = (source / "model.safetensors").read_bytes()
    for out, fragment in ((user, "is not an m3vit export"), (notes, "is not a folder"),
                          (source, "is the checkpoint being exported"), (source / "sub", "inside it")):
        code, _, err = _cli(capsys, "export", "--checkpoint", source, "--task", "sal", "--out", out,
                            "--calibration", "2")
        _one_line_error(code, err, str(out), fragment)
    assert sorted(p.name for p in user.iterdir()) == ["data.csv", "notes.txt"]
    assert (user / "notes.txt").read_text() == "my notes" and notes.read_text() == "keep me"
    assert (source / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in source.iterdir()) == ["config.yaml", "model.safetensors"]
    # an earlier export is m3vit's own: it is replaced
    out = tmp_path / "sal"
    for _ in range(2):
        code, _, err = _cli(capsys, "export", "--checkpoint", source, "--task", "sal", "--out", out,
                            "--calibration", "2")
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine", "notes.txt", "sal"]


def test_export_never_replaces_a_trained_checkpoint(source, tmp_path, capsys):
    """``export --out RUN/final`` (a trained model, a checkpoint m3vit wrote but not an export) is refused:
    an export replaces only an earlier export."""
    trained = save_checkpoint(_tiny_model(), tmp_path / "run" / "final")
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    code, _, err = _cli(capsys, "export", "--checkpoint", source, "--task", "sal", "--out", trained,
                        "--calibration", "2")
    _one_line_error(code, err, str(trained), "is not an m3vit export")
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_save_checkpoint_refuses_a_user_folder_and_a_plain_file(tmp_path):
    user = _user_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="is not an m3vit checkpoint"):
        m3vit.save_checkpoint(_tiny_model(), user)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(OutputError, match="is not a folder"):
        m3vit.save_checkpoint(_tiny_model(), notes)
    assert sorted(p.name for p in user.iterdir()) == ["data.csv", "notes.txt"] and notes.read_text() == "keep me"
    # a checkpoint with a file the user put into it is no longer only m3vit's: refused too
    ckpt = m3vit.save_checkpoint(_tiny_model(), tmp_path / "ckpt")
    (ckpt / "README.txt").write_text("what this checkpoint is")
    with pytest.raises(OutputError, match="it holds README.txt"):
        m3vit.save_checkpoint(_tiny_model(), ckpt)
    assert (ckpt / "README.txt").is_file()


def test_infer_never_overwrites_a_user_file(source, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (120, 40, 200)).save(image)
    out = tmp_path / "preds"
    out.mkdir()
    (out / "photo_sal.png").write_text("the user's own picture")
    code, _, err = _cli(capsys, "infer", "--checkpoint", source, "--task", "sal", "--out", out, image)
    _one_line_error(code, err, str(out / "photo_sal.png"), "was not written by m3vit")
    assert (out / "photo_sal.png").read_text() == "the user's own picture"
    # ... but writes beside it, and may replace its own outputs later
    for _ in range(2):
        code, _, err = _cli(capsys, "infer", "--checkpoint", source, "--task", "semseg", "--out", out, image)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".m3vit-output.json", "photo_sal.png", "photo_semseg.png"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoints_follow_the_umask(tmp_path, tiny_config, mask):
    saved = os.umask(mask)
    try:
        train(tiny_config(train__steps=2, train__checkpoint_every=1), tmp_path / "run")
    finally:
        os.umask(saved)
    for folder in (tmp_path / "run" / "final", latest_checkpoint(tmp_path / "run")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE((tmp_path / "run" / "log.jsonl").stat().st_mode) == 0o666 & ~mask


def test_resume_cleans_only_the_trainers_own_temporary_names(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=2, train__checkpoint_every=1)
    out = tmp_path / "run"
    train(cfg, out)
    # the user's dot-folders, and what interrupted saves of this and the previous version leave behind
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".notes").mkdir()
    (out / ".notes" / "todo.md").write_text("look at step 2")
    leftovers = [out / "checkpoints" / ".step-3.m3vit-tmp-abc123", out / "checkpoints" / ".step-1.tmp-k2j3",
                 out / "checkpoints" / ".step-1.old-4242", out / "checkpoints" / ".step-2.deleting-77",
                 out / ".final.m3vit-old-x9"]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    (out / ".log.jsonl.k3j4h5g6.tmp").write_text("partial")
    train(cfg.replace({"train.steps": 3}), out, resume=True)
    assert (out / ".git" / "HEAD").is_file() and (out / ".notes" / "todo.md").read_text() == "look at step 2"
    assert not any(path.exists() for path in leftovers) and not (out / ".log.jsonl.k3j4h5g6.tmp").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".git", ".notes"]


def test_start_fresh_deletes_nothing_when_a_user_file_is_in_the_run(tmp_path, tiny_config):
    """A file of the user's anywhere in a run folder stops the fresh start before anything is deleted."""
    out = tmp_path / "run"
    train(tiny_config(train__steps=2, train__checkpoint_every=1), out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step-1" / "README").write_text("the user's note in a checkpoint")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(OutputError, match="it holds checkpoints, notes.txt"):
        start_fresh(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "mine"


def test_start_fresh_deletes_a_run_that_is_all_the_trainers(tmp_path, tiny_config):
    out = tmp_path / "run"
    train(tiny_config(train__steps=2, train__checkpoint_every=1), out)
    (out / "checkpoints" / ".step-3.m3vit-tmp-abc123").mkdir()  # an interrupted save
    (out / "checkpoints" / ".step-3.m3vit-tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    start_fresh(out)
    assert not out.exists()


def test_start_fresh_keeps_a_users_file_in_the_tensorboard_folder(tmp_path, tiny_config):
    """The TensorBoard folder loses only event files; anything else there is the user's and stays."""
    out = tmp_path / "run"
    train(tiny_config(train__steps=1), out)
    board = out / "tensorboard"
    board.mkdir(exist_ok=True)
    (board / "events.out.tfevents.123.host").write_bytes(b"event")
    (board / "notes.md").write_text("the user's")
    with pytest.raises(OutputError, match="it holds tensorboard"):
        start_fresh(out)
    assert sorted(p.name for p in board.iterdir()) == ["events.out.tfevents.123.host", "notes.md"]
    assert (board / "notes.md").read_text() == "the user's" and (out / "final").is_dir()


# ----------------------------------------------------------------------------------------------
# 2. One run per folder


def _train_cmd(out, overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "m3vit", "train", "--out", str(out), *overrides], env


def test_two_runs_on_one_folder_the_second_exits_2(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    args, env = _train_cmd(out, tiny_overrides(train__steps=400, train__checkpoint_every=1))
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(out) is None:  # the first run holds the folder
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        args2, _ = _train_cmd(out, tiny_overrides(train__steps=400, train__seed=1))
        second = subprocess.run([*args2, "--resume"], env=env, capture_output=True, text=True, timeout=120)
        _one_line_error(second.returncode, second.stderr, str(out), "in use by another m3vit process")
        first.kill()  # SIGKILL: the lock must still be released
        first.wait()
        third = subprocess.run(args2, env=env, capture_output=True, text=True, timeout=120)
        # the folder holds the first run now; a new run without --resume is refused as usual, not "locked"
        assert third.returncode == 2 and "not empty" in third.stderr and "in use" not in third.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_second_demo_on_a_locked_folder_is_refused(tmp_path):
    from m3vit.experiments import run_demo
    from m3vit.utils.errors import RunLockedError
    from m3vit.utils.io import FolderLock

    with FolderLock(tmp_path / "demo"):
        with pytest.raises(RunLockedError, match="in use by another m3vit process"):
            run_demo(tmp_path / "demo", configs={"a": "missing.yaml"})


# ----------------------------------------------------------------------------------------------
# A full disk is one line and leaves nothing half-written


@contextlib.contextmanager
def _small_tmpfs(tmp_path, size):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill the disk needs root")
    mount = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_files(tmp_path, tiny_overrides, capsys):
    with _small_tmpfs(tmp_path, "600k") as disk:
        out = disk / "run"
        code, _, err = _cli(capsys, "train", "--out", out, *tiny_overrides(train__steps=2, train__checkpoint_every=1))
        _one_line_error(code, err, "no space left on the device")
        names = [p.name for p in out.rglob("*")]
        assert not [n for n in names if "m3vit-tmp" in n or "m3vit-old" in n], names
        for folder in out.rglob("step-*"):  # whatever checkpoint exists is whole
            assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors", "trainer.pt"]


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(source, tmp_path, capsys):
    with _small_tmpfs(tmp_path, "64k") as disk:
        code, _, err = _cli(capsys, "export", "--checkpoint", source, "--task", "sal", "--out", disk / "sal",
                            "--calibration", "2")
        _one_line_error(code, err, str(disk / "sal"), "no space left on the device")
        assert list(disk.iterdir()) == []


def test_start_fresh_leaves_a_folder_that_is_not_a_run_untouched(tmp_path):
    """A folder of the user's with its own config.yaml and log.jsonl (the names the trainer writes) is not a
    run folder: --fresh deletes nothing in it."""
    out = tmp_path / "m3vit"
    out.mkdir()
    (out / "config.yaml").write_text("experiment: my own notes\n")
    (out / "log.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(OutputError, match="config.yaml, log.jsonl"):
        start_fresh(out)
    assert (out / "config.yaml").read_text() == "experiment: my own notes\n" and (out / "log.jsonl").is_file()


def test_pruning_keeps_a_step_checkpoint_holding_a_user_file(tmp_path, tiny_config):
    out = tmp_path / "run"
    cfg = tiny_config(train__steps=2, train__checkpoint_every=1, train__keep_checkpoints=2)
    train(cfg, out)
    (out / "checkpoints" / "step-1" / "NOTES.txt").write_text("why step 1 matters")
    train(cfg.replace({"train.steps": 4, "train.keep_checkpoints": 1}), out, resume=True)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-1", "step-4"]  # step-2 and step-3 were m3vit's alone and were pruned
    assert (out / "checkpoints" / "step-1" / "NOTES.txt").read_text() == "why step 1 matters"


def test_start_fresh_keeps_a_users_log_jsonl_in_a_run_folder(tmp_path, tiny_config):
    """In a run folder, a ``log.jsonl`` that is not the trainer's log (lines that are not its records) is the
    user's: --fresh deletes the run's own files around it and stops, naming it."""
    out = tmp_path / "run"
    train(tiny_config(train__steps=1), out)
    (out / "log.jsonl").write_text("my lab notebook, not JSON\n")
    with pytest.raises(OutputError, match="it holds log.jsonl"):
        start_fresh(out)
    assert (out / "log.jsonl").read_text() == "my lab notebook, not JSON\n"
    assert (out / "final").is_dir() and (out / "config.yaml").is_file()


@pytest.mark.parametrize("text, own", [
    (b"", True),
    (b'{"step": 1, "loss": 0.5}\n{"step": 2, "eval": {"semseg": {"mIoU": 1.0}}}\n', True),
    (b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo', True),        # a torn last line of a killed run
    (b'{"step": 1}\n\n', True),                                  # a blank line an editor added
    (b'{"mine": 1}\n', False),                                    # JSON objects, not the trainer's records
    (b'{"step": 1}\n{"step": "two"}\n', False),
    (b'{"step": 1}\nnot json\n{"step": 3}\n', False),             # only the last line may be torn
    (b'[1, 2]\n', False),
    (b"\x00\xff binary", False),
])
def test_remove_run_folder_deletes_log_jsonl_only_when_it_is_the_trainers(tmp_path, tiny_config, text, own):
    from m3vit.engine.run_folder import remove_run_folder

    out = tmp_path / "run"
    train(tiny_config(train__steps=1), out)
    (out / "log.jsonl").write_bytes(text)
    left = remove_run_folder(out)
    assert left == ([] if own else ["log.jsonl"])
    assert out.exists() == (not own)


def test_resume_refuses_a_log_jsonl_that_is_not_the_runs(tmp_path, tiny_overrides, capsys):
    """A resume rewrites the log (drops the steps after the checkpoint): a log.jsonl of the user's in the run
    folder stops it before anything is written, in one line, the file untouched."""
    out = tmp_path / "run"
    overrides = tiny_overrides(train__steps=1, train__checkpoint_every=1)
    assert _cli(capsys, "train", "--out", out, *overrides)[0] == 0
    (out / "log.jsonl").write_text("step 1 looked fine\n")
    before = sorted(p.name for p in out.rglob("*"))
    code, _, err = _cli(capsys, "train", "--out", out, "--resume",
                        *tiny_overrides(train__steps=2, train__checkpoint_every=1))
    _one_line_error(code, err, "log.jsonl is not the run's log", "move it out")
    assert (out / "log.jsonl").read_text() == "step 1 looked fine\n"
    assert sorted(p.name for p in out.rglob("*")) == before



def test_start_fresh_waits_for_no_run_it_refuses_a_locked_run_folder(tmp_path, tiny_config):
    """A run folder in use (its lock held, e.g. by ``m3vit train --resume``) is not deleted under the run."""
    from m3vit.utils.errors import RunLockedError
    from m3vit.utils.io import FolderLock

    out = tmp_path / "run"
    train(tiny_config(train__steps=1), out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with FolderLock(out):
        with pytest.raises(RunLockedError, match="in use by another m3vit process"):
            start_fresh(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


@pytest.mark.parametrize("link", ["final", "checkpoints/step-1", "tensorboard", "log.jsonl", "checkpoints"])
def test_start_fresh_never_follows_a_link_out_of_the_run(tmp_path, tiny_config, link):
    """A link in the run folder (to the user's checkpoint, another run's events, ...) is the user's: nothing
    is deleted, in the run or where the link points."""
    out = tmp_path / "run"
    train(tiny_config(train__steps=1, train__checkpoint_every=1), out)
    elsewhere = tmp_path / "mine"
    source = out / link
    if source.is_dir():
        shutil.copytree(source, elsewhere)
        shutil.rmtree(source)
    elif source.exists():
        shutil.copy(source, elsewhere)
        source.unlink()
    else:  # the run has no such entry (tensorboard without the package): link to a folder of events
        elsewhere.mkdir()
        (elsewhere / "events.out.tfevents.1.other-run").write_bytes(b"event")
    source.symlink_to(elsewhere)
    mine = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(OutputError, match=f"it holds {link.split('/')[0]}"):
        start_fresh(out)
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == mine
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_pruning_never_follows_a_step_folder_that_is_a_link(tmp_path, tiny_config):
    out = tmp_path / "run"
    cfg = tiny_config(train__steps=1, train__checkpoint_every=1)
    train(cfg, out)
    mine = tmp_path / "my_model"
    shutil.copytree(out / "final", mine)
    (out / "checkpoints" / "step-0").symlink_to(mine)
    train(cfg.replace({"train.steps": 4, "train.keep_checkpoints": 2}), out, resume=True)
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in (out / "final").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0", "step-3", "step-4"]


def test_start_fresh_keeps_a_hand_written_config_in_a_run_folder(tmp_path, tiny_config):
    """A config.yaml the user wrote (comments, their layout) in a run folder is theirs, even when it is a run
    config: --fresh deletes nothing."""
    out = tmp_path / "run"
    train(tiny_config(train__steps=1), out)
    text = "# my settings for this run\n" + (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text)
    with pytest.raises(OutputError, match="config.yaml"):
        start_fresh(out)
    assert (out / "config.yaml").read_text() == text and (out / "final").is_dir()


def test_resume_refuses_to_rewrite_a_hand_written_config(tmp_path, tiny_config, capsys):
    """``train --config RUN/config.yaml --out RUN --resume`` on a config the user wrote into RUN: a resume
    rewrites the config, so it is refused in one line, the file untouched."""
    run = tmp_path / "myrun"
    run.mkdir()
    text = "# lab notebook: the settings of this run\n" + tiny_config(train__steps=1).to_yaml()
    (run / "config.yaml").write_text(text)
    code, _, err = _cli(capsys, "train", "--config", run / "config.yaml", "--out", run, "--resume")
    _one_line_error(code, err, "config.yaml is not the run config m3vit train wrote")
    assert (run / "config.yaml").read_text() == text and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_an_old_temporary_folder_holding_a_user_file_is_kept(tmp_path, tiny_config):
    """m3vit 0.1's temporary folder names are cleaned up only while they hold nothing but checkpoint files."""
    out = tmp_path / "run"
    cfg = tiny_config(train__steps=1, train__checkpoint_every=1)
    train(cfg, out)
    kept = out / "checkpoints" / ".step-3.old-1"
    kept.mkdir()
    (kept / "NOTES.txt").write_text("mine")
    gone = out / "checkpoints" / ".step-2.old-1"
    gone.mkdir()
    (gone / "model.safetensors").write_bytes(b"partial")
    train(cfg.replace({"train.steps": 2}), out, resume=True)
    assert (kept / "NOTES.txt").read_text() == "mine" and not gone.exists()
