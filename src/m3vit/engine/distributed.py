"""Distributed training plumbing: the process group from torchrun's environment and the data order.

``torchrun --nproc_per_node=N -m m3vit train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
``init_distributed`` joins the group (gloo on CPU, nccl on CUDA). ``GlobalBatchSampler`` draws one
permutation of the dataset per epoch from ``(seed, epoch)`` and cuts it into *global* batches of
``batch_size * world_size`` samples; rank ``r`` takes the ``r``-th slice of each. The global batch is
therefore the same set of samples whatever the number of processes, and a single process with
``batch_size * N`` sees exactly what ``N`` processes see together.

Synchronised BatchNorm: ``torch.nn.SyncBatchNorm`` only runs on GPUs (torch 2.13 raises for CPU
tensors), so ``convert_sync_batchnorm`` uses it on CUDA and ``GroupBatchNorm2d`` (batch statistics
all-reduced through a differentiable all-reduce, any backend) on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..utils.errors import ConfigError

__all__ = ["env_rank", "DistInfo", "init_distributed", "cleanup_distributed", "barrier", "GlobalBatchSampler", "epoch_permutation",
           "all_reduce_mean", "gather_objects", "GroupBatchNorm2d", "convert_sync_batchnorm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def env_rank() -> int:
    """This process's global rank before (or after) joining the group: 0 for a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single-process ``DistInfo``.

    The backend is ``nccl`` when training on CUDA and ``gloo`` on CPU. An already initialised group is
    reused (and left for its owner to destroy).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=False)
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("joined a %s process group: rank %d of %d", backend, rank, world_size)
    return DistInfo(rank, world_size, local_rank, initialized_here=True)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over processes of each value (identity when not distributed); keys must agree."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.cpu().tolist())}


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` when not distributed)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def epoch_permutation(length: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of ``epoch``: a permutation of ``range(length)``, a pure function of (seed, epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x5A4D]))
    return rng.permutation(length)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Indices of this rank's share of every global batch of one epoch, from batch ``start`` on.

    Each epoch has ``len(dataset) // (batch_size * world_size)`` global batches (the incomplete last
    one is dropped). Use with ``DataLoader(batch_size=batch_size, drop_last=False)``: consecutive
    runs of ``batch_size`` indices form this rank's per-step batches. ``set_epoch(epoch, start)``
    selects the epoch (and the first batch, to resume mid-epoch) before an iterator is made.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.length, self.batch_size, self.seed = int(length), int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.length // self.global_batch
        if self.batches_per_epoch < 1:  # the run config's sizes: a user's setting, not a bug
            raise ConfigError(
                f"the training set has {self.length} samples, fewer than one global batch of {self.global_batch} "
                f"(train.batch_size={batch_size} x {world_size} process(es)); lower train.batch_size or use more data"
            )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start batch {start} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start = int(epoch), int(start)

    def global_batches(self) -> list[np.ndarray]:
        """Every global batch of the current epoch (all ranks' samples), in order."""
        order = epoch_permutation(self.length, self.seed, self.epoch)
        g = self.global_batch
        return [order[i * g:(i + 1) * g] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches()[self.start:]:
            yield from (int(i) for i in batch[lo:hi])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes with a gradient: the gradient of each input is the sum of the outputs'
    gradients over processes (each process's loss depends on the shared sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch, on any backend.

    Each process all-reduces its per-channel sums of ``x`` and ``x**2`` and its pixel count (autograd
    flows through the all-reduce, as in ``SyncBatchNorm``); outside training, or without a process
    group, it is a plain ``BatchNorm2d``. Parameters and buffers keep BatchNorm2d's names, so state
    dicts load into the plain model.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GroupBatchNorm2d expects [B, C, H, W], got shape {list(x.shape)}")
        channels = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), float(x.numel() // channels))
        stats = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every BatchNorm2d synchronised over the process group: ``nn.SyncBatchNorm`` on
    CUDA, ``GroupBatchNorm2d`` otherwise (weights and running statistics carried over)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        synced = GroupBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device_type))
    return module
