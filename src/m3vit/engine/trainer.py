"""Multi-task training: one batched backbone pass over all tasks per step, checkpoints, exact resume, DDP.

``train(cfg, out_dir)`` runs a ``RunConfig`` and writes the run folder laid out in ``engine.run_folder``
(``config.yaml``, ``log.jsonl``, ``checkpoints/step-N/``, ``final/``), which also holds the rules of a run
folder: one run per folder, what a resume may change, which checkpoint it continues from, the cleanup.

The loss of a step is ``sum_t w_t * L_t + aux_weight * aux`` (+ ``cross_task_weight`` times the
weighted losses of every prediction of the optional training-only cross-task module:
``engine.cross_task``, the official TAM or ``CrossTaskHead``). A step checkpoint is written inside
one temporary directory that is renamed when complete, so a checkpoint directory exists only whole;
``trainer.pt`` holds everything else a resume needs (optimizer, schedule step, GradScaler, the
torch/numpy/python RNG states of every process, the data order: epoch and position, the cross-task
module). ``resume=True`` continues from the newest checkpoint that verifies (``run_folder.latest_checkpoint``: a
damaged newer one, e.g. a truncated ``trainer.pt``, is skipped with a warning) and, on CPU with the same
thread count, ends with bit-identical weights to an uninterrupted run: the data order is a
permutation drawn from ``(train.seed, epoch)`` and augmentation a pure function of
``(data.seed, index, epoch)``, so nothing depends on where a run was interrupted. Resuming a finished
run trains no step (``TrainResult.steps_run == 0``). Ctrl-C during training raises
``TrainingInterrupted`` (a ``KeyboardInterrupt``) naming the checkpoint a resume would continue from.

Distributed (``torchrun --nproc_per_node=N -m m3vit train ...``): ``train.batch_size`` is per
process; every global batch of ``batch_size * N`` samples is the same set a single process with
``batch_size * N`` would see. The model is wrapped in ``DistributedDataParallel``
(``find_unused_parameters=False``: the experts of a layer are slices of stacked parameters, so an
expert that receives no token still has a (zero) gradient, and every task runs every step); gradients are
averaged over processes, so each process's task losses are means over its own samples and the MoE
balance loss is computed per process on its own tokens (a single process computes it on the
whole global batch: a small, expected difference). The heads' BatchNorms normalise with the
statistics of the global batch: ``nn.SyncBatchNorm`` on CUDA and, because PyTorch's SyncBatchNorm does
not run on CPU (torch 2.13 raises for CPU tensors), ``distributed.GroupBatchNorm2d`` on CPU/gloo. Rank 0 alone logs, shows progress, evaluates
and writes checkpoints (with barriers around); checkpoints hold the unwrapped model.
"""

from __future__ import annotations

import logging
import math
import os
import io
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from ..models.checkpoint import (CHECKPOINT, CONFIG, TRAINER_STATE, WEIGHTS, read_weights_into, save_checkpoint,
                                 task_embed_layout_error, verify_checkpoint, write_checkpoint_files)
from ..models.config import REFERENCE_OPTIONS, ConfigError
from ..nn.heads import CrossTaskHead
from ..utils.errors import CheckpointError, M3ViTError, one_line
from ..utils.io import atomic_directory, write_bytes
from .builders import build_eval_dataset, build_model, build_tasks, build_train_dataset, collate, loss_weights
from .config import RunConfig
from .cross_task import TaskAttention
from .device import resolve_device
from .distributed import (DistInfo, GlobalBatchSampler, all_reduce_mean, barrier, cleanup_distributed,
                          convert_sync_batchnorm, env_rank, gather_objects, init_distributed)
from .run_folder import (FINAL, LOG_FILE, TENSORBOARD, RunDirectoryError, append_log, claim_run_folder,
                         config_differences, latest_checkpoint, prepare_run_folder, prune_checkpoints,
                         step_checkpoint_path, truncate_log)
from .schedules import LRSchedule, StepScheduler, build_optimizer

__all__ = ["train", "TrainResult", "TrainingError", "TrainingInterrupted"]

log = logging.getLogger(__name__)


class TrainingError(M3ViTError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGINT) at ``step``; ``checkpoint`` is the newest step checkpoint a
    ``--resume`` of ``out_dir`` would continue from (None: none was saved yet, a resume starts over). Raised on
    every process of a distributed run; ``rank`` says which."""

    def __init__(self, out_dir: Path, step: int, total_steps: int, checkpoint: Path | None, rank: int = 0):
        super().__init__(f"training interrupted at step {step} of {total_steps}")
        self.out_dir, self.step, self.total_steps, self.checkpoint = out_dir, step, total_steps, checkpoint
        self.rank = rank


@dataclass
class TrainResult:
    """What a finished ``train`` call produced (on every process; only rank 0 wrote files)."""

    out_dir: Path
    final_dir: Path
    log_path: Path
    steps: int
    start_step: int
    seconds: float
    images_per_s: float
    last_losses: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    @property
    def steps_run(self) -> int:
        """Steps this call trained: 0 when a resumed run was already finished (``last_losses`` is then empty)."""
        return self.steps - self.start_step


# ----------------------------------------------------------------------------------------------
# Precision, seeds, RNG state (devices: engine/device.py).


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 autocast needs a CUDA device; use 'bf16' or 'none' on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in a ``torch.load(weights_only=True)``-safe form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# The module trained: model (+ training-only cross-task module), so DDP covers both.


class _TrainModule(nn.Module):
    """``forward(images) -> (outputs, aux, extra)``: ``extra`` is None or a list of ``{task: prediction}``
    made by the cross-task module (one per TAM level, or the refined predictions)."""

    def __init__(self, model: nn.Module, cross_task_head: CrossTaskHead | TaskAttention | None):
        super().__init__()
        self.model = model
        self.cross_task_head = cross_task_head

    def forward(self, images: torch.Tensor):
        head = self.cross_task_head
        if isinstance(head, TaskAttention):
            outputs, stages = self.model.forward_with_head_features(images)
            extra = head(stages, tuple(images.shape[-2:]))
        else:
            outputs = self.model(images)
            extra = None if head is None else [head(outputs)]
        return outputs, self.model.aux_loss(), extra


def _build_cross_task_module(cfg: RunConfig, model: nn.Module, task_channels: dict[str, int]):
    """The training-only cross-task module of ``train.cross_task_head`` / ``cross_task_module`` (or None)."""
    tcfg = cfg.train
    if not tcfg.cross_task_head:
        return None
    if tcfg.cross_task_module == "predictions":
        return CrossTaskHead(task_channels)
    if len(task_channels) < 2:
        raise ConfigError(f"train.cross_task_module: tam needs at least two tasks, got {list(task_channels)}")
    stages = model.config.head_stages
    too_deep = [level for level in tcfg.tam_levels if level + 1 >= stages]
    if too_deep:
        raise ConfigError(f"train.tam_levels: level {too_deep[0]} reads head stage {too_deep[0] + 1} but the model's "
                          f"heads have head_stages={stages} (allowed levels 0..{stages - 2})")
    return TaskAttention(task_channels, model.config.head_channels, tcfg.tam_levels)


class _LossWindow:
    """Sums of the logged quantities since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, values: dict[str, float], images: int, seconds: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(out / TENSORBOARD))


# ----------------------------------------------------------------------------------------------


def train(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
          callbacks: Sequence[Callable[[dict], None]] | None = None) -> TrainResult:
    """Train the model of ``cfg`` into ``out_dir`` (see the module docstring for the layout).

    ``resume=True`` continues the run in ``out_dir`` from its newest checkpoint that verifies (a config
    that differs in anything but ``RESUMABLE_KEYS`` is refused); without it ``out_dir`` must be empty
    or absent. ``callbacks`` are called on rank 0 with every record written to ``log.jsonl``.
    ``cfg.train.progress`` turns the tqdm bar on or off.
    """
    cfg = RunConfig.from_dict(cfg.to_dict())  # a validated private copy
    tcfg = cfg.train
    out = Path(out_dir)
    device_type = resolve_device(tcfg.device).type  # fails early for an unavailable device
    if tcfg.amp == "fp16" and device_type != "cuda":
        raise ConfigError("train.amp: fp16 autocast needs a CUDA device; use 'bf16' or 'none' on CPU")
    # One run per folder: the main process locks it for the whole run (released when it ends, even if
    # killed). Every process checks the directory before joining the group; rank 0 writes only after.
    with claim_run_folder(out, cfg, resume, lock=env_rank() == 0) as checkpoint:
        info = init_distributed(device_type)
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            if tcfg.deterministic:
                if device_type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                    torch.backends.cudnn.benchmark = False
                torch.use_deterministic_algorithms(True, warn_only=True)
            device = resolve_device(tcfg.device, info.local_rank)
            result = _Trainer(cfg, out, device, info, checkpoint, callbacks or ()).run()
            barrier(info)  # no rank tears the group down while another still talks to it
            return result
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)
            cleanup_distributed(info)


class _Trainer:
    """One training run (built by ``train``); ``run()`` does the work."""

    def __init__(self, cfg: RunConfig, out: Path, device: torch.device, info: DistInfo, checkpoint: Path | None,
                 callbacks: Sequence[Callable[[dict], None]]):
        self.cfg, self.out, self.device, self.info, self.callbacks = cfg, out, device, info, list(callbacks)
        tcfg = cfg.train
        _seed_everything(tcfg.seed)
        self.dataset = build_train_dataset(cfg)
        task_channels = dict(self.dataset.task_channels)
        self.model = build_model(cfg, task_channels)
        self.tasks = build_tasks(task_channels, self.dataset)
        self.weights = loss_weights(cfg, list(task_channels))
        head = _build_cross_task_module(cfg, self.model, task_channels)
        if info.distributed:
            self.model.heads = convert_sync_batchnorm(self.model.heads, device.type)
            if head is not None:
                head = convert_sync_batchnorm(head, device.type)
        self.module = _TrainModule(self.model, head).to(device)
        if info.distributed:  # the same initial weights everywhere (by seed, and DDP broadcasts), then
            torch.manual_seed(tcfg.seed + 7919 * info.rank)  # per-process randomness (drop path, router noise)
        self.sampler = GlobalBatchSampler(len(self.dataset), tcfg.batch_size, tcfg.seed, info.rank, info.world_size)
        self.total_steps = tcfg.steps if tcfg.steps is not None else tcfg.epochs * self.sampler.batches_per_epoch
        self.optimizer = build_optimizer(tcfg, {"model": self.model, **({"cross_task_head": head} if head else {})})
        self.scheduler = StepScheduler(self.optimizer, LRSchedule.from_config(tcfg, self.total_steps,
                                                                              self.sampler.batches_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=tcfg.amp == "fp16" and device.type == "cuda")
        self.step, self.epoch, self.position, self.elapsed = 0, 0, 0, 0.0
        self.checkpoint = checkpoint
        self.eval_dataset = None
        self.last_losses: dict[str, float] = {}

    # -- state ---------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        head = self.module.cross_task_head
        return {
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "global_batch": self.sampler.global_batch, "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": gather_objects(_rng_state(self.device), self.info),
            "cross_task_head": None if head is None else head.state_dict(),
        }

    def _restore(self, directory: Path) -> None:
        """Continue from a step checkpoint that ``latest_checkpoint`` verified: weights read once, into the live
        parameters (the optimizer keeps them), then the trainer state."""
        verified = verify_checkpoint(directory)  # header and config only: cheap
        # Options added after the checkpoint was written are absent from its config.yaml: they resume with
        # today's values (a warning says so); any other difference means another run's checkpoint.
        own, in_file = set(self.model.state_dict()), set(verified.layout)
        if own != in_file:  # an option that moves weights (e.g. task_embed) differs from the checkpoint's
            missing, unexpected = sorted(own - in_file), sorted(in_file - own)
            raise task_embed_layout_error(f"--resume: {directory}", missing, unexpected) or CheckpointError(
                f"--resume: {directory}: the weights do not match the run's model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})")
        added_since = {k for k in REFERENCE_OPTIONS if k not in verified.meta["model"]}
        diff = [d for d in config_differences(verified.config.to_dict(), self.model.config.to_dict())
                if d[0] not in added_since]
        if diff:
            key, saved, now = diff[0]
            raise CheckpointError(f"{verified.config_path}: model.{key} is {saved!r} there but {now!r} in this run; "
                                  f"it is not a checkpoint of this run")
        read_weights_into(self.model, verified, self.device)
        state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
        self._warn_new_model_options(directory)
        head = self.module.cross_task_head
        if head is not None:
            if state.get("cross_task_head") is None:
                raise RunDirectoryError(f"{directory}: no cross-task head state to resume (train.cross_task_head)")
            try:
                head.load_state_dict(state["cross_task_head"])
            except RuntimeError:
                raise RunDirectoryError(f"--resume: {directory}: the saved cross-task module does not match "
                                        f"train.cross_task_module={self.cfg.train.cross_task_module!r}") from None
        try:  # verified for its keys and step, not for what the optimizer state holds
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{directory / TRAINER_STATE}: its optimizer state does not fit this run's "
                                  f"parameters ({one_line(exc)}); move {directory.name} away to resume from an "
                                  f"earlier checkpoint") from None
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if int(state["global_batch"]) != self.sampler.global_batch:
            log.warning("resuming with a global batch of %d instead of %d: the data order of epoch %d changes",
                        self.sampler.global_batch, state["global_batch"], self.epoch)
            self.position = self.position * int(state["global_batch"]) // self.sampler.global_batch
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            _set_rng_state(rng[self.info.rank], self.device)
        else:
            log.warning("the checkpoint holds RNG states of %d process(es), not %d: reseeding", len(rng),
                        self.info.world_size)
            torch.manual_seed(self.cfg.train.seed + 7919 * self.info.rank + self.step)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", directory, self.step, self.epoch, self.position)

    def _warn_new_model_options(self, directory: Path) -> None:
        """A checkpoint written before the reference options existed resumes with today's values: say so."""
        try:
            saved = yaml.safe_load((directory / CONFIG).read_text()).get("model", {})
        except (OSError, yaml.YAMLError, AttributeError):
            return
        absent = {k: getattr(self.model.config, k) for k in REFERENCE_OPTIONS if k not in saved}
        if absent:
            log.warning("%s was written before the model options %s existed; resuming with %s", directory,
                        sorted(absent), absent)

    def _save_step_checkpoint(self) -> None:
        state = self._trainer_state()  # collective (gathers RNG states): every process calls it
        if self.info.is_main:
            extra = {"run": self.cfg.to_dict(), "step": self.step}
            buffer = io.BytesIO()
            torch.save(state, buffer)  # in memory first: a full disk is then a plain OSError
            with atomic_directory(step_checkpoint_path(self.out, self.step), CHECKPOINT) as tmp:
                write_checkpoint_files(self.model, tmp, extra=extra)
                write_bytes(tmp / TRAINER_STATE, buffer.getvalue(), durable=True)
            prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        barrier(self.info)

    # -- logging -------------------------------------------------------------------------------

    def _emit(self, record: dict) -> None:
        append_log(self.out / LOG_FILE, record)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(key, value, record["step"])
            for task, metrics in record.get("eval", {}).items():
                for name, value in metrics.items():
                    self.writer.add_scalar(f"eval/{task}/{name}", value, record["step"])
        for callback in self.callbacks:
            callback(record)

    def _evaluate(self) -> dict:
        from .evaluator import evaluate

        if self.eval_dataset is None:
            self.eval_dataset = build_eval_dataset(self.cfg)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # evaluation must not move the training RNG
            return evaluate(self.model, self.eval_dataset, batch_size=self.cfg.eval.batch_size,
                            eval_cfg=self.cfg.eval, pathway="all", device=self.device)

    # -- the loop ------------------------------------------------------------------------------

    def _loader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.train.seed)  # keeps the global RNG untouched
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.cfg.train.batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=self.cfg.data.num_workers, drop_last=False, generator=generator,
            pin_memory=self.device.type == "cuda")

    def _train_step(self, batch: dict, wrapped: nn.Module) -> dict[str, float]:
        tcfg = self.cfg.train
        images = batch["image"].to(self.device, non_blocking=True)
        targets = {t: batch[t].to(self.device, non_blocking=True) for t in self.tasks}
        lr = self.scheduler.apply()
        with _autocast(tcfg.amp, self.device):
            outputs, aux, extra = wrapped(images)
        losses = {t: self.tasks[t].loss(outputs[t].float(), targets[t]) for t in self.tasks}
        total = sum(self.weights[t] * losses[t] for t in self.tasks) + tcfg.aux_weight * aux.float()
        cross = None
        if extra is not None:  # every extra prediction with the main task weights (the official TAM loss)
            cross = sum(self.weights[t] * self.tasks[t].loss(level[t].float(), targets[t])
                        for level in extra for t in self.tasks)
            total = total + tcfg.cross_task_weight * cross
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if tcfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), tcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        names = ["loss", "aux", *(f"loss/{t}" for t in self.tasks)] + (["loss/cross_task"] if cross is not None else [])
        values = torch.stack([total.detach(), aux.detach().float(), *(losses[t].detach() for t in self.tasks),
                              *([cross.detach()] if cross is not None else [])]).tolist()
        record = dict(zip(names, values))
        if not math.isfinite(record["loss"]) and not self.scaler.is_enabled():
            bad = [k for k, v in record.items() if not math.isfinite(v)]
            advice = ("lower train.lr, set train.grad_clip" if tcfg.grad_clip is None else
                      f"lower train.lr or train.grad_clip (now {tcfg.grad_clip:g})")
            raise TrainingError(f"the loss is not finite at step {self.step + 1} ({', '.join(bad)}); {advice} "
                                f"or check the loss weights")
        record["lr"] = lr
        return record

    def run(self) -> TrainResult:
        cfg, info, out = self.cfg, self.info, self.out
        log_path = out / LOG_FILE
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
            if self.step > self.total_steps:
                raise RunDirectoryError(f"--resume: the newest checkpoint ({self.checkpoint.name}) is past the run's "
                                        f"length of {self.total_steps} steps; set train.steps >= {self.step}")
            if self.step == self.total_steps:
                log.info("%s is finished (step %d of %d): no step to train", out, self.step, self.total_steps)
        if info.is_main:
            prepare_run_folder(out, cfg)
        barrier(info)
        start_step = self.step
        if info.is_main:
            truncate_log(log_path, start_step)
        self.writer = _tensorboard_writer(out) if info.is_main else None
        wrapped: nn.Module = self.module
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=False)
        self.module.train()
        progress = None
        if cfg.train.progress and info.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True)
        window, started = _LossWindow(), time.perf_counter()
        run_images, run_seconds = 0, 0.0
        loader = self._loader()
        try:
            while self.step < self.total_steps:
                if self.position >= self.sampler.batches_per_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                self.dataset.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, self.position)
                tick = time.perf_counter()
                for batch in loader:
                    record = self._train_step(batch, wrapped)
                    self.step, self.position = self.step + 1, self.position + 1
                    now = time.perf_counter()
                    images = self.sampler.global_batch
                    window.add({k: v for k, v in record.items() if k != "lr"}, images, now - tick)
                    self.elapsed += now - tick
                    run_images, run_seconds = run_images + images, run_seconds + (now - tick)
                    self.last_losses = {k: v for k, v in record.items() if k.startswith("loss") or k == "aux"}
                    if progress is not None:
                        postfix = {k.removeprefix("loss/"): f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
                        postfix["loss"] = f"{record['loss']:.3g}"
                        postfix["img/s"] = f"{images / max(now - tick, 1e-9):.1f}"
                        progress.set_postfix(postfix, refresh=False)
                        progress.update(1)
                    self._after_step(record, window, progress)
                    if self.step >= self.total_steps:
                        break
                    tick = time.perf_counter()
                else:
                    continue
                break
            if info.is_main and (self.step > start_step or not (out / FINAL / WEIGHTS).is_file()):
                save_checkpoint(self.model, out / FINAL, extra={"run": cfg.to_dict(), "step": self.step})
            barrier(info)
        except KeyboardInterrupt:  # Ctrl-C: say where a resume would continue (the progress bar closes first)
            raise TrainingInterrupted(out, self.step, self.total_steps, self._resumable_checkpoint(),
                                      info.rank) from None
        finally:
            if progress is not None:
                progress.close()
            if self.writer is not None:
                self.writer.close()
        seconds = time.perf_counter() - started
        return TrainResult(out_dir=out, final_dir=out / FINAL, log_path=log_path, steps=self.step,
                           start_step=start_step, seconds=seconds,
                           images_per_s=run_images / run_seconds if run_seconds > 0 else 0.0,
                           last_losses=all_reduce_mean(self.last_losses, info) if self.last_losses else {},
                           rank=info.rank, world_size=info.world_size)

    def _resumable_checkpoint(self) -> Path | None:
        try:
            return latest_checkpoint(self.out)
        except CheckpointError:  # none verifies: a resume would say so
            return None

    def _after_step(self, record: dict, window: _LossWindow, progress) -> None:
        tcfg, step = self.cfg.train, self.step
        if step % tcfg.log_every == 0 or step == self.total_steps:
            means = all_reduce_mean(window.means(), self.info)
            if self.info.is_main:
                line = {"step": step, "epoch": self.epoch, "lr": record["lr"], "loss": means.pop("loss"),
                        **{k: means[k] for k in sorted(means) if k.startswith("loss/")}, "aux": means["aux"],
                        "images_per_s": window.images / max(window.seconds, 1e-9), "time": round(self.elapsed, 3)}
                self._emit(line)
            window.__init__()
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == self.total_steps):
            if self.info.is_main:
                metrics = self._evaluate()
                self._emit({"step": step, "eval": metrics})
                if progress is not None:
                    flat = {f"{t}/{m}": f"{v:.3g}" for t, ms in metrics.items() for m, v in list(ms.items())[:1]}
                    progress.set_postfix(flat, refresh=True)
            barrier(self.info)
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == self.total_steps:
            self._save_step_checkpoint()
