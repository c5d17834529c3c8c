"""Exact resume: a run SIGKILLed mid-way and resumed with --resume ends with the same weights (and log) as an
uninterrupted run; resuming a finished run, extending one, and ignoring what a killed save left behind; falling
back past a damaged newest checkpoint; Ctrl-C saying how to resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from m3vit.engine.run_folder import latest_checkpoint
from m3vit.engine.trainer import train


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different[:5]}"


def train_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def cli(out, overrides, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "m3vit", "train", "--out", str(out), *overrides, *extra], env


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_overrides):
    # 24 steps over 6 epochs of 4 batches, a checkpoint every 3 steps: the kill lands mid-epoch
    overrides = tiny_overrides(train__steps=24, train__checkpoint_every=3, train__keep_checkpoints=2)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    args, env = cli(reference, overrides)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    args, env = cli(interrupted, overrides)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while latest_checkpoint(interrupted) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (interrupted / "final").exists(), "the run finished before the kill; the test proves nothing"
    killed_at = int(latest_checkpoint(interrupted).name.split("-")[1])
    assert killed_at < 24

    args, env = cli(interrupted, overrides, "--resume")
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    assert_same_weights(reference / "final", interrupted / "final")
    assert_same_weights(reference / "checkpoints" / "step-24", interrupted / "checkpoints" / "step-24")
    # the log: each step once, and the same numbers as the uninterrupted run (timings aside)
    ref, res = train_lines(reference), train_lines(interrupted)
    assert [r["step"] for r in res] == list(range(1, 25))
    drop = ("images_per_s", "time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ref] == \
        [{k: v for k, v in r.items() if k not in drop} for r in res]


def test_resume_finished_and_extended_runs(tmp_path, tiny_config):
    # constant schedule: an extended run follows the same learning rates as a run planned that long
    cfg = tiny_config(train__steps=6, train__schedule="constant", train__checkpoint_every=2)
    train(cfg, tmp_path / "full")

    short = tmp_path / "short"
    train(cfg.replace({"train.steps": 3}), short)
    before = weights(short / "final")
    again = train(cfg.replace({"train.steps": 3}), short, resume=True)  # finished: nothing left to do
    assert again.steps == 3 and again.start_step == 3
    after = weights(short / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["step"] for r in train_lines(short)] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"past the run's length of 2 steps; set train.steps >= 3"):
        train(cfg.replace({"train.steps": 2}), short, resume=True)
    assert "steps: 3" in (short / "config.yaml").read_text()  # a refused resume changes nothing

    # what an interrupted save and prune leave behind, a torn log line, a bare step directory
    ckpts = short / "checkpoints"
    (ckpts / ".step-9.tmp-abc").mkdir()
    (ckpts / ".step-9.tmp-abc" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "step-8").mkdir()
    (ckpts / "step-8" / "model.safetensors").write_bytes(b"no trainer state: incomplete")
    with open(short / "log.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')
    assert latest_checkpoint(short) == ckpts / "step-3"
    result = train(cfg.replace({"train.checkpoint_every": 1, "train.keep_checkpoints": 3}), short, resume=True)
    assert result.start_step == 3 and result.steps == 6
    assert_same_weights(tmp_path / "full" / "final", short / "final")
    assert [r["step"] for r in train_lines(short)] == list(range(1, 7))
    assert not [p for p in short.rglob(".*")]


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, tiny_config, caplog):
    cfg = tiny_config(train__steps=2)
    train(cfg, tmp_path / "a")
    # a run killed before its first checkpoint: config.yaml and a log line, no checkpoint
    killed = tmp_path / "b"
    killed.mkdir()
    (killed / "config.yaml").write_text((tmp_path / "a" / "config.yaml").read_text())
    (killed / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with caplog.at_level("WARNING"):
        result = train(cfg, killed, resume=True)
    assert "starting from scratch" in caplog.text and result.start_step == 0
    assert_same_weights(tmp_path / "a" / "final", killed / "final")
    assert [r["step"] for r in train_lines(killed)] == [1, 2]
    # --resume on an empty or absent directory is a fresh run too
    assert train(cfg, tmp_path / "c", resume=True).steps == 2


def test_resume_a_run_written_before_the_reference_options(tmp_path, tiny_config, caplog):
    """A run directory from before these options existed: its config lacks the new keys (their defaults
    keep the earlier behaviour, so it still matches) and its checkpoint lacks the model options (the
    resumed run says which values it now uses)."""
    import yaml

    cfg = tiny_config(train__steps=2, train__checkpoint_every=2)
    out = tmp_path / "old"
    train(cfg, out)
    run = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("lr_update", "weight_decay_exclude", "cross_task_module", "tam_levels"):
        del run["train"][key]
    del run["data"]["scale_rotate"]
    (out / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    ckpt = out / "checkpoints" / "step-2" / "config.yaml"
    meta = yaml.safe_load(ckpt.read_text())
    for key in ("balance_loss", "init", "task_embed", "pos_embed_resize", "pretrained_experts"):
        del meta["model"][key]
    ckpt.write_text(yaml.safe_dump(meta, sort_keys=False))
    with caplog.at_level("WARNING"):
        result = train(cfg.replace({"train.steps": 3}), out, resume=True)
    assert result.start_step == 2 and result.steps == 3
    assert "was written before the model options" in caplog.text and "'balance_loss'" in caplog.text


def test_resume_with_a_different_task_embedding_layout_is_a_clear_error(tmp_path, tiny_config):
    from m3vit.utils.errors import CheckpointError

    cfg = tiny_config(train__steps=2, model__router="task_conditioned", model__task_embed="layer")
    out = tmp_path / "run"
    train(cfg, out)
    # what an old run config means today: no task_embed key, so the registered model's "model" layout
    config = (out / "config.yaml").read_text().replace("  task_embed: layer\n", "")
    (out / "config.yaml").write_text(config)
    changed = cfg.to_dict()
    del changed["model"]["task_embed"]
    from m3vit.engine.config import RunConfig

    with pytest.raises(CheckpointError, match="one task embedding per MoE layer .* set task_embed: layer"):
        train(RunConfig.from_dict(changed).replace({"train.steps": 3}), out, resume=True)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: resume from the newest one that verifies, and say which one was skipped and why
# ---------------------------------------------------------------------------------------------
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damaged", ["trainer.pt", "model.safetensors"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, tiny_config, caplog, damaged):
    # constant schedule: a run stopped at step 4 and resumed to 6 follows a 6-step run's learning rates
    cfg = tiny_config(train__steps=6, train__schedule="constant", train__checkpoint_every=2,
                      train__keep_checkpoints=3)
    train(cfg, tmp_path / "full")
    run = tmp_path / "run"
    train(cfg.replace({"train.steps": 4}), run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    _truncate(ckpts / "step-4" / damaged)

    assert latest_checkpoint(run) == ckpts / "step-2"
    with caplog.at_level("WARNING"):
        result = train(cfg, run, resume=True)
    assert result.start_step == 2 and result.steps == 6
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skipped and f"skipping checkpoint step-4, newer than step-2: {ckpts / 'step-4' / damaged}" in skipped[0]
    assert "truncated" in skipped[0]
    assert_same_weights(tmp_path / "full" / "final", run / "final")  # exact, as from an undamaged step-2
    assert [r["step"] for r in train_lines(run)] == list(range(1, 7))


def test_resume_when_no_checkpoint_verifies_is_one_line(tmp_path, tiny_overrides, capsys):
    from m3vit.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(train__steps=4, train__keep_checkpoints=3)
    assert main(["train", "--out", str(out), *overrides]) == 0
    for step in (2, 4):
        _truncate(out / "checkpoints" / f"step-{step}" / "trainer.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(out), *overrides, "--set", "train.steps=6", "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: none of the checkpoints in {out / 'checkpoints'} can be resumed from "
                               f"(step-4, step-2; ")
    assert f"the newest failed with: {out / 'checkpoints' / 'step-4' / 'trainer.pt'}: damaged or truncated" in lines[0]


def test_an_optimizer_state_that_does_not_fit_is_one_line(tmp_path, tiny_overrides, capsys):
    """A trainer.pt whose keys and step verify but whose optimizer state does not fit the parameters."""
    from m3vit.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(train__steps=2)
    assert main(["train", "--out", str(out), *overrides]) == 0
    state_path = out / "checkpoints" / "step-2" / "trainer.pt"
    state = torch.load(state_path, weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(state, state_path)
    capsys.readouterr()
    assert main(["train", "--out", str(out), *overrides, "--set", "train.steps=4", "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"error: {state_path}: its optimizer state does not fit this run's parameters")


def test_resuming_a_finished_run_says_it_is_finished(tmp_path, tiny_overrides, capsys):
    from m3vit.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(train__steps=4)
    assert main(["train", "--out", str(out), *overrides]) == 0
    before = weights(out / "final")
    capsys.readouterr()
    assert main(["train", "--out", str(out), *overrides, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == (f"run {out} is finished (step 4 of 4); to train longer pass "
                                       f"--set train.steps=N with N > 4")
    assert "nan" not in printed and "loss" not in printed
    after = weights(out / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sigint_exits_130_and_says_how_to_resume(tmp_path, tiny_overrides, capsys):
    import shlex

    from m3vit.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(train__steps=400, train__checkpoint_every=2)
    args, env = cli(out, overrides)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    try:
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert not (out / "final").exists(), "the run finished before the interrupt; the test proves nothing"
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    resumable = latest_checkpoint(out)
    command = f"m3vit train --config {out / 'config.yaml'} --out {out} --resume"
    assert re.fullmatch(rf"interrupted at step (\d+) of 400; to resume: {re.escape(command)} "
                        rf"\(it continues from {re.escape(str(resumable))}\)", lines[0]), lines[0]

    # the command it prints resumes the run (here shortened: train.steps may change on resume)
    at = int(resumable.name.split("-")[1])
    capsys.readouterr()
    assert main([*shlex.split(command)[1:], "--set", f"train.steps={at + 2}"]) == 0
    assert f"resumed at step {at}" in capsys.readouterr().out
