"""The model side of ``m3vit serve``, free of any web framework: one loaded model answering any subset of its tasks.

``PredictionService`` holds the model (``workers`` replicas of it, each driven by its own thread) and
everything a request needs: task names checked against the model, an uploaded image decoded within
the size limits, each task's pathway run alone (``model(images, tasks=[t])``, timed around that call
only), the experts its tokens chose per MoE block (``MoE.last_routing["indices"]``), and the coloured
maps (``Task.colorize``) and decoded arrays (``Task.decode``) at the uploaded image's size.

Concurrency: at most ``workers + queue_size`` requests are admitted at once (``admit``); one more is
refused with ``ServiceBusyError`` (HTTP 503). Model calls run only on the worker threads, one call at
a time per replica, so a replica's ``last_routing`` and streaming buffers are never shared between two
requests. Task switching reloads nothing: every replica is loaded once (``model_loads``), and a request
for task B right after task A runs B's pathway only (with ``--stream-experts``: reads only the experts
B's tokens pick, reported per task as ``experts_read`` / ``bytes_read``).
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import SimpleQueue

import numpy as np
import torch
from PIL import Image

from ..efficiency.streaming import expert_weight_bytes
from ..engine.builders import build_tasks
from ..engine.device import resolve_device
from ..data.images import ImageReadError, ImageTooLargeError, read_image
from ..data.transforms import preprocess
from ..engine.inference import check_input_size
from ..models import moe_block_indices
from ..tasks.base import resize_bilinear
from ..utils.errors import InputError, M3ViTError

__all__ = ["RequestError", "ServiceBusyError", "PathwayRun", "PredictionService", "read_image_bytes",
           "process_memory_mb", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_MAX_PIXELS", "DEFAULT_QUEUE_SIZE"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_QUEUE_SIZE = 8
_MB = 2**20


class RequestError(InputError):
    """A request the client must fix; ``status`` is the HTTP status it is answered with (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServiceBusyError(M3ViTError):
    """Every worker is busy and the queue is full: the request is refused (HTTP 503); retry later."""

    status = 503


@dataclass
class PathwayRun:
    """One task's pathway on one image: the raw output ``[C, h, w]`` at the network's size (CPU float32),
    its latency, the experts its tokens chose per MoE block, and the expert reads it caused when streaming."""

    task: str
    output: torch.Tensor
    ms: float
    experts: list[dict] = field(default_factory=list)
    experts_read: int = 0
    bytes_read: int = 0


# ----------------------------------------------------------------------------------------------
# Images and memory
# ----------------------------------------------------------------------------------------------
def read_image_bytes(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """An uploaded image file's bytes as ``float32 [3, H, W]`` in ``[0, 1]``, read by m3vit's one image reader
    (``m3vit.data.images.read_image``: bit depth, EXIF orientation, the pixel limit from the header).

    Over ``max_pixels`` raises ``RequestError`` with status 413 (nothing is decoded); bytes that are not a
    readable image raise ``RequestError`` (400).
    """
    if not data:
        raise RequestError("the 'image' field is empty; attach an image file (PNG, JPEG, ...)")
    name = "the 'image' field"
    try:
        return read_image(io.BytesIO(data), max_pixels=max_pixels, name=name)
    except ImageTooLargeError as exc:
        size = (f"is {exc.width}x{exc.height} (width x height) = {exc.width * exc.height:,} pixels, over"
                if exc.width else "has more pixels than")
        raise RequestError(f"the image {size} this server's limit of {max_pixels or 0:,} (--max-pixels); "
                           f"send a smaller image", status=413) from None
    except ImageReadError as exc:  # its message names the field already
        raise RequestError(f"{exc}; send a PNG, JPEG or another image file") from None


def process_memory_mb() -> tuple[float, float]:
    """``(resident, peak resident)`` memory of this process in MiB (``VmRSS``, ``VmHWM``; else ``ru_maxrss``)."""
    rss = peak = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return (peak if rss is None else rss), peak


# ----------------------------------------------------------------------------------------------
# The worker pool: one thread per model replica
# ----------------------------------------------------------------------------------------------
class _ModelPool:
    """Runs ``job(model)`` on the first free replica, each replica on its own thread (so model calls on one
    replica never overlap). The queue is unbounded here: ``PredictionService.admit`` bounds it."""

    def __init__(self, replicas: Sequence[torch.nn.Module]):
        self._jobs: SimpleQueue = SimpleQueue()
        self._threads = [threading.Thread(target=self._work, args=(model,), name=f"m3vit-serve-worker-{i}", daemon=True)
                         for i, model in enumerate(replicas)]
        for thread in self._threads:
            thread.start()

    def submit(self, job) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def _work(self, model) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = job(model)
            except BaseException as exc:  # noqa: BLE001 - handed to the request that submitted the job
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self, timeout: float = 30.0) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _routing_counts(model, blocks: Sequence[int]) -> list[dict]:
    """Per MoE block of the last forward: how many of the image's token -> expert assignments went to each expert."""
    out = []
    for block, layer in zip(blocks, model.moe_layers):
        indices = layer.last_routing["indices"].reshape(-1).cpu()
        held = getattr(layer, "expert_ids", None)
        if held is not None:  # an extracted layer: indices count among the held experts
            indices = torch.tensor(held)[indices]
        width = getattr(layer, "router_experts", layer.num_experts)
        out.append({"block": int(block), "counts": torch.bincount(indices, minlength=width).tolist()})
    return out


def _run_pathways(model, images: torch.Tensor, tasks: Sequence[str]) -> list[PathwayRun]:
    """Each task's pathway alone on ``images`` ``[1, 3, h, w]`` (runs on a worker thread)."""
    device = _model_device(model)
    images = images.to(device)
    streamer = getattr(model, "expert_streamer", None)
    blocks = moe_block_indices(model)
    runs = []
    with torch.no_grad():
        for task in tasks:
            loads = streamer.stats.loads if streamer else 0
            read = streamer.stats.bytes_read if streamer else 0
            _synchronize(device)
            start = time.perf_counter()
            output = model(images, tasks=[task])[task]
            _synchronize(device)
            ms = (time.perf_counter() - start) * 1e3
            runs.append(PathwayRun(task, output[0].float().cpu(), ms, _routing_counts(model, blocks),
                                   (streamer.stats.loads - loads) if streamer else 0,
                                   (streamer.stats.bytes_read - read) if streamer else 0))
    return runs


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_b64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return _b64(buf.getvalue())


def _npy_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    return _b64(buf.getvalue())


# ----------------------------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------------------------
class PredictionService:
    """One model (``workers`` replicas), its limits and its request counters; see the module docstring.

    Build it with ``PredictionService.load(model_or_checkpoint, ...)``. Thread-safe: ``admit``,
    ``submit``, ``read_image`` and ``encode`` may be called from many threads at once.
    """

    def __init__(self, replicas: Sequence[torch.nn.Module], *, owns_models: bool = False,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pixels: int = DEFAULT_MAX_PIXELS,
                 queue_size: int = DEFAULT_QUEUE_SIZE, checkpoint: str | None = None):
        if not replicas:
            raise ValueError("PredictionService needs at least one model replica")
        if not max_upload_mb > 0:
            raise InputError(f"max_upload_mb (--max-upload-mb) must be > 0, got {max_upload_mb}")
        if int(max_pixels) < 1:
            raise InputError(f"max_pixels (--max-pixels) must be >= 1, got {max_pixels}")
        if int(queue_size) < 0:
            raise InputError(f"queue_size (--queue-size) must be >= 0, got {queue_size}")
        self.replicas = list(replicas)
        self.model = self.replicas[0]
        self.checkpoint = checkpoint
        self.max_upload_mb = float(max_upload_mb)
        self.max_pixels = int(max_pixels)
        self.queue_size = int(queue_size)
        self.input_size = check_input_size(self.model)
        self.device = _model_device(self.model)
        self.streaming = getattr(self.model, "expert_streamer", None) is not None
        self.task_objects = build_tasks(dict(self.model.config.tasks))
        self.model_loads = len(self.replicas)
        self.requests_served = 0
        self._owns_models = owns_models
        self._capacity = len(self.replicas) + self.queue_size
        self._in_flight = 0
        self._lock = threading.Lock()
        for model in self.replicas:
            model.eval()
        self._pool = _ModelPool(self.replicas)
        self._closed = False

    @classmethod
    def load(cls, model_or_checkpoint, *, stream_experts: bool = False, device: str | torch.device | None = None,
             workers: int = 1, **limits) -> "PredictionService":
        """A service around a ``MultiTaskModel`` (used as it is; ``workers > 1`` deep-copies it) or a
        checkpoint directory (loaded ``workers`` times on ``device``: ``"auto"`` (default), ``"cpu"``, ``"cuda"``
        or a ``torch.device``; with ``stream_experts`` its experts stay in the file, see
        ``m3vit.efficiency.streaming``)."""
        if int(workers) < 1:
            raise InputError(f"workers (--workers) must be >= 1, got {workers}")
        workers = int(workers)
        if isinstance(model_or_checkpoint, (str, os.PathLike)):
            if isinstance(device, torch.device):
                target = device
            else:
                target = resolve_device(device if device is not None else "auto", key="--device")
            if stream_experts:
                from ..efficiency import load_streaming_model

                replicas = [load_streaming_model(model_or_checkpoint, map_location=target) for _ in range(workers)]
            else:
                from ..models import load_checkpoint

                replicas = [load_checkpoint(model_or_checkpoint, map_location=target) for _ in range(workers)]
            return cls(replicas, owns_models=True, checkpoint=str(model_or_checkpoint), **limits)
        model = model_or_checkpoint
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "resolve_tasks"):
            raise TypeError(f"expected a MultiTaskModel or a checkpoint directory, got {type(model).__name__}")
        if stream_experts and getattr(model, "expert_streamer", None) is None:
            raise InputError("stream_experts needs a checkpoint directory (the experts are read from its file); "
                             "pass the checkpoint path, or a model from m3vit.efficiency.load_streaming_model")
        if device is not None and torch.device(device) != _model_device(model):
            raise InputError(f"device {str(device)!r} applies to checkpoints; move the model yourself "
                             f"(it is on {_model_device(model)})")
        if workers > 1 and getattr(model, "expert_streamer", None) is not None:
            raise InputError("workers > 1 with a streaming model needs the checkpoint directory (each replica "
                             "opens its own streamer)")
        replicas = [model] + [copy.deepcopy(model) for _ in range(workers - 1)]
        return cls(replicas, owns_models=False, **limits)

    # -- requests -----------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return len(self.replicas)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered (running, queued or being encoded)."""
        return self._in_flight

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the ``workers + queue_size`` request slots; ``ServiceBusyError`` when none is free."""
        with self._lock:
            if self._closed:
                raise ServiceBusyError("the server is shutting down; retry later")
            if self._in_flight >= self._capacity:
                raise ServiceBusyError(f"the server is busy ({self._in_flight} requests in progress or queued, "
                                       f"--workers {self.workers} + --queue-size {self.queue_size}); retry later")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def check_upload_size(self, num_bytes: int) -> None:
        """``RequestError`` (413) when an upload of ``num_bytes`` is over ``max_upload_mb``."""
        if num_bytes > self.max_upload_bytes:
            raise RequestError(f"the upload is {num_bytes / _MB:.1f} MB, over this server's limit of "
                               f"{self.max_upload_mb:g} MB (--max-upload-mb); send a smaller image", status=413)

    def resolve_tasks(self, tasks: str | Sequence[str] | None) -> list[str]:
        """Comma-separated (or listed) task names checked against the model; empty or ``None``: every task."""
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not tasks:
            return list(self.model.tasks)
        unknown = [t for t in dict.fromkeys(tasks) if t not in self.model.tasks]
        if unknown:  # named here, each cut short: a client's text is not echoed whole
            shown = ", ".join(repr(t[:40]) for t in unknown[:5])
            shown += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise RequestError(f"unknown task(s) {shown}; this model's tasks are {list(self.model.tasks)}: pass some "
                               f"of them comma-separated in the 'tasks' field")
        return self.model.resolve_tasks(list(tasks))

    def read_image(self, data: bytes) -> torch.Tensor:
        """An upload as ``[3, H, W]`` in ``[0, 1]``, within the size limits (``RequestError`` otherwise)."""
        self.check_upload_size(len(data))
        return read_image_bytes(data, self.max_pixels)

    def submit(self, image: torch.Tensor, tasks: Sequence[str]) -> Future:
        """Run each task's pathway on ``image`` ``[3, H, W]`` on a worker: a future of ``list[PathwayRun]``."""
        if self._closed:
            raise ServiceBusyError("the server is shutting down; retry later")
        batch = preprocess([image], self.input_size)
        return self._pool.submit(lambda model: _run_pathways(model, batch, list(tasks)))

    def encode(self, image_size: Sequence[int], runs: Sequence[PathwayRun], raw: bool = False) -> dict:
        """The JSON answer of ``POST /api/predict`` for pathway runs on an image of ``image_size`` (H, W)."""
        size = tuple(int(s) for s in image_size)
        tasks, experts = {}, {}
        for run in runs:
            pred = resize_bilinear(run.output[None], size)[0]
            task = self.task_objects[run.task]
            entry = {"png": _png_b64(task.colorize(pred, kind="pred")), "ms": round(run.ms, 3),
                     "experts_read": run.experts_read, "bytes_read": run.bytes_read}
            if raw:
                entry["npy"] = _npy_b64(task.decode(pred))
            tasks[run.task] = entry
            experts[run.task] = run.experts
        with self._lock:
            self.requests_served += 1
        memory = self.memory()
        return {"tasks": tasks, "experts": experts, "memory_mb": memory["rss_mb"], "memory": memory,
                "image_size": list(size), "input_size": list(self.input_size), "model_loads": self.model_loads}

    def predict(self, data: bytes, tasks: str | Sequence[str] | None = None, raw: bool = False) -> dict:
        """The whole request synchronously (decode, pathways, encode): what ``POST /api/predict`` answers."""
        with self.admit():
            tasks = self.resolve_tasks(tasks)
            image = self.read_image(data)
            runs = self.submit(image, tasks).result()
            return self.encode(image.shape[-2:], runs, raw)

    # -- reports ------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Process memory and where the model's weights are (MiB); with streaming, the streamers' counters."""
        rss, peak = process_memory_mb()
        total, experts = expert_weight_bytes(self.model)
        out = {"rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1), "replicas": self.workers,
               "weights_mb": round(total / _MB, 3), "expert_weights_mb": round(experts / _MB, 3)}
        if self.streaming:
            streamers = [m.expert_streamer for m in self.replicas]
            out["stream_buffers_mb"] = round(streamers[0].buffer_bytes / _MB, 3)
            out["streamed"] = {"expert_reads": sum(s.stats.loads for s in streamers),
                               "bytes_read": sum(s.stats.bytes_read for s in streamers),
                               "peak_live_buffers": max(s.stats.peak_live for s in streamers),
                               "buffers": streamers[0].stats.buffers}
        if self.device.type == "cuda":
            out["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(self.device) / _MB, 1)
        return out

    def info(self) -> dict:
        """What ``GET /api/info`` answers: the model, its tasks and experts, the limits and counters."""
        cfg = self.model.config
        moe = bool(cfg.moe_blocks)
        memory = self.memory()
        return {
            "model": cfg.name,
            "checkpoint": self.checkpoint,
            "tasks": list(self.model.tasks),
            "num_experts": cfg.num_experts if moe else 0,
            "top_k": cfg.top_k if moe else 0,
            "moe_blocks": [int(b) for b in cfg.moe_blocks],
            "router": cfg.router if moe else None,
            "streaming": self.streaming,
            "device": str(self.device),
            "img_size": list(cfg.img_size),
            "input_size": list(self.input_size),
            "patch_size": cfg.patch_size,
            "workers": self.workers,
            "queue_size": self.queue_size,
            "max_upload_mb": self.max_upload_mb,
            "max_pixels": self.max_pixels,
            "model_loads": self.model_loads,
            "requests_served": self.requests_served,
            "memory_mb": memory["rss_mb"],
            "memory": memory,
        }

    def close(self) -> None:
        """Stop the workers (a request in progress finishes first) and close streamers this service opened."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
        if self._owns_models:
            for model in self.replicas:
                streamer = getattr(model, "expert_streamer", None)
                if streamer is not None:
                    streamer.close()
