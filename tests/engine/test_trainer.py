"""The trainer: it learns, it is deterministic, it writes the run directory of the contract, its options work,
and the ``m3vit train`` error paths are one line with exit code 2."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3vit.cli import main
from m3vit.engine.builders import build_model, build_train_dataset
from m3vit.engine.config import ConfigError, RunConfig
from m3vit.engine.run_folder import RunDirectoryError
from m3vit.engine.trainer import train
from m3vit.models import load_checkpoint
from m3vit.models.checkpoint import read_checkpoint_config

TRAIN_KEYS = {"step", "epoch", "lr", "loss", "aux", "images_per_s", "time"}


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_overfits_a_handful_of_scenes(tmp_path, tiny_config):
    cfg = tiny_config(data__train_length=4, data__augment="none", train__steps=30, train__lr=0.01,
                      train__schedule="constant", train__weight_decay=0.0, train__checkpoint_every=0)
    seen = []
    train(cfg, tmp_path / "run", callbacks=[seen.append])
    losses = [r["loss"] for r in seen if "loss" in r]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    # every step sees the same 4 scenes: the loss must fall clearly (measured ~35% of the first after 30 steps)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=3)
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    train(cfg.replace({"train.seed": 1}), tmp_path / "c")
    a, b, c = (weights(tmp_path / x / "final") for x in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [r["loss"] for r in records(tmp_path / "a")] == [r["loss"] for r in records(tmp_path / "b")]


def test_data_workers_do_not_change_the_result(tmp_path, tiny_config):
    # data.num_workers may change on resume, so it must not change what is trained
    train(tiny_config(train__steps=5), tmp_path / "inline")
    train(tiny_config(train__steps=5, data__num_workers=2), tmp_path / "workers")
    a, b = weights(tmp_path / "inline" / "final"), weights(tmp_path / "workers" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contract(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=5, train__checkpoint_every=1, train__keep_checkpoints=2, train__log_every=2)
    out = tmp_path / "run"
    result = train(cfg, out)
    assert result.steps == 5 and result.final_dir == out / "final" and not result.resumed
    assert RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())).to_dict() == cfg.to_dict()
    # log lines every log_every steps and at the end, with the contract's keys
    lines = records(out)
    assert [r["step"] for r in lines] == [2, 4, 5]
    tasks = build_train_dataset(cfg).tasks
    for r in lines:
        assert set(r) == TRAIN_KEYS | {f"loss/{t}" for t in tasks}
        assert r["epoch"] == (r["step"] - 1) // 4  # 16 scenes, batch 4: 4 steps per epoch
    assert result.last_losses["loss"] == pytest.approx(lines[-1]["loss"])  # the last window holds one step
    # the newest keep_checkpoints step directories, complete; nothing temporary left
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-5"]
    assert {p.name for p in (ckpts / "step-5").iterdir()} == {"model.safetensors", "config.yaml", "trainer.pt"}
    assert not [p for p in out.rglob(".*")]
    # the final checkpoint: the model, its run config and step; loads and equals the last step checkpoint
    meta = read_checkpoint_config(out / "final")
    assert meta["step"] == 5 and RunConfig.from_dict(meta["run"]).to_dict() == cfg.to_dict()
    assert not (out / "final" / "trainer.pt").exists()
    final, last = weights(out / "final"), weights(ckpts / "step-5")
    assert all(torch.equal(final[k], last[k]) for k in final)
    model = load_checkpoint(out / "final")
    assert model.config.tasks == dict(build_train_dataset(cfg).task_channels)
    state = torch.load(ckpts / "step-5" / "trainer.pt", weights_only=True)
    assert state["step"] == 5 and state["epoch"] == 1 and state["position"] == 1
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_epochs_set_the_length(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=None, train__epochs=2, train__batch_size=5, train__checkpoint_every=0)
    result = train(cfg, tmp_path / "run")
    assert result.steps == 2 * (16 // 5)  # the incomplete last batch of an epoch is dropped
    assert [r["epoch"] for r in records(tmp_path / "run")] == [0, 0, 0, 1, 1, 1]


def test_batch_larger_than_dataset_is_a_clear_error_and_leaves_no_folder(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(tiny_config(train__batch_size=32), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # the folder the run created goes with the failed setup


def test_refuses_non_empty_out_and_changed_config_on_resume(tmp_path, tiny_config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirectoryError, match="not empty.*--resume"):
        train(tiny_config(), out)
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        train(tiny_config(), out, resume=True)
    assert (out / "notes.txt").read_text() == "keep me"
    train(tiny_config(train__steps=2), tmp_path / "done")
    with pytest.raises(RunDirectoryError, match=r"train\.lr differs"):
        train(tiny_config(train__steps=2, train__lr=0.5), tmp_path / "done", resume=True)
    with pytest.raises(RunDirectoryError, match=r"model\.embed_dim differs"):
        train(tiny_config(model__embed_dim=64, model__num_heads=2), tmp_path / "done", resume=True)


def test_gradient_clipping_bounds_the_update(tmp_path, tiny_config):
    # plain SGD, one step: the update is -lr * clipped gradient, so its norm is at most lr * grad_clip
    common = dict(train__steps=1, train__optimizer="sgd", train__momentum=0.0, train__weight_decay=0.0,
                  train__schedule="constant", train__lr=0.1, train__checkpoint_every=0)
    cfg = tiny_config(**common, train__grad_clip=1e-3)
    torch.manual_seed(cfg.train.seed)  # the trainer seeds, then builds the model: the same initial weights
    initial = build_model(cfg, build_train_dataset(cfg).task_channels).state_dict()

    def update_norm(run_cfg, name):
        train(run_cfg, tmp_path / name)
        final = weights(tmp_path / name / "final")
        names = [k for k, _ in build_model(run_cfg, {"semseg": 8}).named_parameters() if not k.startswith("heads.")]
        names += [k for k in final if k.startswith("heads.") and "running" not in k and "num_batches" not in k]
        return torch.sqrt(sum(((final[k] - initial[k]) ** 2).sum() for k in set(names))).item()

    clipped = update_norm(cfg, "clipped")
    free = update_norm(tiny_config(**common), "free")
    assert 0 < clipped <= 0.1 * 1e-3 * (1 + 1e-4)
    assert free > 100 * clipped  # without clipping the same step is far larger: the bound is the clip's doing


def test_cross_task_head_trains_and_stays_out_of_the_model(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=4, train__cross_task_head=True, train__cross_task_weight=0.5)
    out = tmp_path / "run"
    train(cfg, out)
    lines = records(out)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss/cross_task"]])).all() for r in lines)
    assert all(r["loss/cross_task"] > 0 for r in lines)
    final = weights(out / "final")
    assert not [k for k in final if "cross" in k]
    plain = build_model(cfg, build_train_dataset(cfg).task_channels).state_dict()
    assert set(final) == set(plain)  # exactly the model's tensors
    state = torch.load(out / "checkpoints" / "step-4" / "trainer.pt", weights_only=True)
    head = state["cross_task_head"]
    assert head and any(v.abs().sum() > 0 for k, v in head.items() if k.startswith("refine"))  # it learned
    # and a resumed run picks the head up again
    train(cfg.replace({"train.steps": 6}), out, resume=True)
    assert [r["step"] for r in records(out)][-2:] == [5, 6]


def test_amp_modes_on_cpu(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(tiny_config(train__amp="fp16", train__device="cpu"), tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()
    train(tiny_config(train__amp="bf16", train__device="cpu", train__steps=2), tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "bf16"))
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16" / "final").values() if v.is_floating_point())


def test_periodic_evaluation_is_logged(tmp_path, tiny_config):
    cfg = tiny_config(train__steps=4, train__eval_every=2, data__tasks=["semseg", "depth"])
    out = tmp_path / "run"
    train(cfg, out)
    evals = [r for r in records(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[0]["eval"]) == {"semseg", "depth"}
    assert "mIoU" in evals[0]["eval"]["semseg"] and "rmse" in evals[0]["eval"]["depth"]


def test_eval_does_not_change_training(tmp_path, tiny_config):
    train(tiny_config(train__steps=3, data__tasks=["sal"]), tmp_path / "plain")
    train(tiny_config(train__steps=3, data__tasks=["sal"], train__eval_every=1), tmp_path / "evaluated")
    a, b = weights(tmp_path / "plain" / "final"), weights(tmp_path / "evaluated" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- m3vit train on the command line ---------------------------------------------------------


def test_cli_train_prints_a_summary(tmp_path, tiny_overrides, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *tiny_overrides(train__steps=2, train__progress=True)]) == 0
    captured = capsys.readouterr()
    assert "2 steps" in captured.out and str(tmp_path / "run" / "final") in captured.out
    assert "2/2" in captured.err and "img/s" in captured.err  # the tqdm bar with images/s
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["unknown key", "bad value", "missing config", "non-empty out", "changed config",
                                  "bad override syntax"])
def test_cli_train_errors_are_one_line(tmp_path, tiny_overrides, capsys, case):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *tiny_overrides(train__steps=1)]
    expected = {"unknown key": "train.nope", "bad value": "train.lr", "missing config": "does not exist",
                "non-empty out": "not empty", "changed config": "train.batch_size differs",
                "bad override syntax": "--set"}[case]
    if case == "unknown key":
        args += ["--set", "train.nope=1"]
    elif case == "bad value":
        args += ["--set", "train.lr=-1"]
    elif case == "missing config":
        args += ["--config", str(tmp_path / "missing.yaml")]
    elif case == "bad override syntax":
        args += ["--set", "train.steps"]
    elif case in ("non-empty out", "changed config"):
        assert main(list(args)) == 0
        capsys.readouterr()
        if case == "changed config":
            args += ["--set", "train.batch_size=2", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err and "Traceback" not in err


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_non_finite_loss_advises_only_what_is_not_already_set(tmp_path, tiny_config, grad_clip):
    """A loss weight of 1e308 overflows the total loss to inf at the first step."""
    from m3vit.engine.trainer import TrainingError

    cfg = tiny_config(train__steps=2, train__grad_clip=grad_clip, data__tasks=["semseg"],
                      train__loss_weights={"semseg": 1e308})
    with pytest.raises(TrainingError) as err:
        train(cfg, tmp_path / "run")
    message = str(err.value)
    assert message.startswith("the loss is not finite at step 1") and "\n" not in message
    if grad_clip is None:
        assert "set train.grad_clip" in message
    else:
        assert "set train.grad_clip" not in message and "train.grad_clip (now 1)" in message
