"""Expert streaming: run a checkpoint's MoE model with its expert weights left in the file, two experts in memory.

This is the paper's computation reordering used as software for a memory-starved device.
``load_streaming_model(checkpoint_dir)`` returns a model with the usual forward API
(``model(images, tasks=[...])``, ``model.resolve_tasks``, ``model.config``) whose every MoE layer is a
``StreamingMoE``. Such a layer routes all its tokens first (``MoE.route``, the layer's one routing
implementation, which also sorts them into one queue per expert), then walks the experts with a
non-empty queue in index order. While expert ``e`` computes on its queue, a background thread reads
the next busy expert's ``w1 [D, H]``, ``b1 [H]``, ``w2 [H, D]``, ``b2 [D]`` rows straight from
``model.safetensors`` into the other of two preallocated buffers (double buffering). An expert that no
token picked is never read. The combine runs exactly the ops of the resident ``"per_expert"`` dispatch
(``addmm -> gelu_ -> addmm -> scale -> index_add_``, experts in the same order), so predictions equal
a resident model's bit for bit when that model dispatches per expert; a model whose ``dispatch`` is
``"batched"`` (or ``"auto"`` choosing it for short queues) computes the same sums with batched GEMMs
whose rounding differs in the last bits (~1e-7 relative in float32).

Memory behaviour:

* Resident in memory: every non-expert weight (patch embedding, attention, dense MLPs, norms, routers,
  heads) and two expert buffers shared by all MoE layers (``2 * (2*D*H + D + H)`` values), plus the
  activations. Nothing else of the experts: they are read with ``os.preadv`` at the byte offsets that
  the safetensors header gives, so no memory map of the file grows the process's resident set (the
  page cache is the kernel's, reclaimable, and not counted in the process RSS). ``safe_open(...)
  .get_slice(name)[e]`` is not used for the experts because in safetensors 0.8 it returns a view into a
  memory map of the whole file: the pages of every expert touched stay in the process's RSS while the
  view lives.
* The model is built on the ``meta`` device, so the stacked expert tensors are never allocated, not
  even transiently; only the non-expert weights are materialised and read from the file.
* Cost: each forward reads every busy expert of every MoE layer from the file (page cache or disk);
  the read of the first busy expert of each layer is not overlapped with compute.
* Prefetch (the background reader) is on by default when it can overlap: on CUDA (the copy is DMA), or
  on a CPU with a core that torch's compute threads leave free (``default_prefetch``). On a CPU whose
  every core computes, reading from the page cache is a CPU copy that competes with the GEMMs: on 2
  cores with 2 threads, m3vit_base E64 at 512x512 ran 1.18x the resident per-expert model with prefetch
  and 1.09x without (``benchmarks/streaming_memory.py``, BENCHMARKS.md), so there it is off.
* On CUDA the non-expert weights and the two expert buffers live on the GPU; the reader thread fills
  one of two pinned host buffers, then copies it to the device buffer on a side stream with
  ``non_blocking=True``; the compute stream waits for that copy's event, and a buffer is only
  overwritten after the compute that used it has finished (events both ways).

Eval only: a ``StreamingMoE`` raises in training mode and computes without autograd (its buffers are
overwritten by the next expert). One forward at a time per model: the MoE layers share the two buffers.
``model.expert_streamer.stats`` counts expert reads, bytes read and the
number of expert buffers live (being filled or computed on) at once: never more than two.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.checkpoint import TensorsOnMeta, build_on_meta, read_weights_into, verify_checkpoint
from ..models.m3vit import MultiTaskModel
from ..nn.dispatch import expert_queues, queued_gates
from ..nn.moe import MoE, Routing
from ..utils.errors import CheckpointError, InputError
from ..utils.safetensors_layout import TensorEntry, pread_exact, read_safetensors_layout, tensor_bytes

__all__ = [
    "default_prefetch",
    "usable_cpus",
    "EXPERT_PARAMS",
    "TensorEntry",
    "read_safetensors_layout",
    "ExpertTensors",
    "ExpertWeights",
    "StreamStats",
    "ExpertStreamer",
    "StreamingMoE",
    "load_streaming_model",
    "expert_weight_bytes",
]

log = logging.getLogger(__name__)

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


# ----------------------------------------------------------------------------------------------
# The streamer: two buffers, one reader thread
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertTensors:
    """Where one MoE layer's stacked ``w1 [E, D, H]``, ``b1 [E, H]``, ``w2 [E, H, D]``, ``b2 [E, D]`` lie in
    the file."""

    layer: str
    w1: TensorEntry
    b1: TensorEntry
    w2: TensorEntry
    b2: TensorEntry

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def row(self, param: str, expert: int) -> tuple[int, int]:
        """Absolute byte offset and length of expert ``expert``'s rows of ``param``."""
        entry: TensorEntry = getattr(self, param)
        row_bytes = entry.nbytes // entry.shape[0]
        return entry.begin + expert * row_bytes, row_bytes


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights in a streaming buffer: ``w1 [D, H]``, ``b1 [H]``, ``w2 [H, D]``, ``b2 [D]``."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor


@dataclass
class StreamStats:
    """What the streamer did: expert reads, bytes read, and how many expert buffers were live at once.

    A buffer is live from the moment its read is submitted until the compute that uses it is done.
    """

    buffers: int = 2
    loads: int = 0
    bytes_read: int = 0
    live: int = 0
    peak_live: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        with self._lock:
            self.loads = self.bytes_read = 0
            self.peak_live = self.live


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_prefetch(device: str | torch.device) -> bool:
    """Whether reading the next expert in the background can overlap compute: on CUDA, or when this
    process has more CPUs than torch's intra-op threads (a core left for the reader thread)."""
    return torch.device(device).type == "cuda" or usable_cpus() > torch.get_num_threads()


class ExpertStreamer:
    """Reads single experts of a checkpoint's MoE layers into two preallocated buffers, one ahead of compute.

    ``stream(tensors, experts)`` yields ``(expert, ExpertWeights)`` for each expert in ``experts`` in
    order; the next expert is read by a background thread while the caller computes on the current one.
    The yielded weights are only valid until the generator is resumed. ``prefetch=False`` reads each
    expert when it is needed (no overlap); ``None`` (default) decides by ``default_prefetch(device)``.
    """

    def __init__(self, path: str | os.PathLike, dim: int, hidden_dim: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", prefetch: bool | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.prefetch = default_prefetch(self.device) if prefetch is None else prefetch
        self.stats = StreamStats()
        self._cuda = self.device.type == "cuda"
        if self.device.type not in ("cpu", "cuda"):
            raise InputError(f"expert streaming runs on 'cpu' or 'cuda', got device {str(self.device)!r}")
        shapes = {"w1": (dim, hidden_dim), "b1": (hidden_dim,), "w2": (hidden_dim, dim), "b2": (dim,)}
        # Host buffers are what the reader writes into (pinned on CUDA); on CPU they are the compute buffers.
        self._host = [{k: torch.empty(s, dtype=dtype, pin_memory=self._cuda) for k, s in shapes.items()}
                      for _ in range(2)]
        self._host_views = [{k: tensor_bytes(t) for k, t in slot.items()} for slot in self._host]
        if self._cuda:
            self._device_buffers = [{k: torch.empty(s, dtype=dtype, device=self.device) for k, s in shapes.items()}
                                    for _ in range(2)]
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._computed = [torch.cuda.Event() for _ in range(2)]
        else:
            self._device_buffers = self._host
        self._busy = [False, False]
        self._fd = os.open(self.path, os.O_RDONLY)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3vit-expert-reader")
        self._finalizer = weakref.finalize(self, _close, self._fd, self._executor)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the two compute buffers (on CUDA, as many pinned host bytes again hold the reads)."""
        return sum(t.numel() * t.element_size() for slot in self._device_buffers for t in slot.values())

    def buffer_pointers(self) -> set[int]:
        """Data pointers of every tensor of the two compute buffers (to check nothing else is used)."""
        return {t.data_ptr() for slot in self._device_buffers for t in slot.values()}

    def close(self) -> None:
        """Close the checkpoint file and stop the reader thread (the model cannot run afterwards)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- buffer bookkeeping (caller thread) --
    def _acquire(self, slot: int) -> None:
        with self.stats._lock:
            if self._busy[slot]:
                raise RuntimeError(f"expert buffer {slot} is still in use (internal error: double-buffer order broken)")
            self._busy[slot] = True
            self.stats.live += 1
            self.stats.peak_live = max(self.stats.peak_live, self.stats.live)

    def _release(self, slot: int) -> None:
        if self._cuda:
            self._computed[slot].record(torch.cuda.current_stream(self.device))
        with self.stats._lock:
            if self._busy[slot]:
                self._busy[slot] = False
                self.stats.live -= 1

    # -- reading (reader thread, or caller thread without prefetch) --
    def _read(self, tensors: ExpertTensors, expert: int, slot: int) -> None:
        if self._cuda:
            self._copied[slot].synchronize()  # the host buffer's previous copy to the device is done
        nbytes = 0
        for name in EXPERT_PARAMS:
            offset, length = tensors.row(name, expert)
            view = self._host_views[slot][name]
            if length != len(view):
                raise ValueError(f"{tensors.layer}.{name}: expert rows of {length} bytes do not fit the "
                                 f"{len(view)}-byte buffer (dtype or shape differs between layers)")
            pread_exact(self._fd, view, offset, self.path)
            nbytes += length
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._computed[slot])  # the compute on the old contents is done
                for name in EXPERT_PARAMS:
                    self._device_buffers[slot][name].copy_(self._host[slot][name], non_blocking=True)
                self._copied[slot].record(self._copy_stream)
        with self.stats._lock:
            self.stats.loads += 1
            self.stats.bytes_read += nbytes

    def _start(self, tensors: ExpertTensors, expert: int, slot: int) -> Future:
        self._acquire(slot)
        if self.prefetch:
            return self._executor.submit(self._read, tensors, expert, slot)
        done: Future = Future()
        done.set_result(None)
        return done

    def _ready(self, future: Future, tensors: ExpertTensors, expert: int, slot: int) -> ExpertWeights:
        if self.prefetch:
            future.result()
        else:
            self._read(tensors, expert, slot)
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        return ExpertWeights(**self._device_buffers[slot])

    def stream(self, tensors: ExpertTensors, experts: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield ``(expert, weights)`` for ``experts`` in order, reading the next one while the caller computes."""
        if self.closed:
            raise RuntimeError(f"the expert streamer of {self.path} is closed")
        experts = list(experts)
        if not experts:
            return
        pending = self._start(tensors, experts[0], 0)
        held: list[int] = [0]
        try:
            for i, expert in enumerate(experts):
                slot = i % 2
                weights = self._ready(pending, tensors, expert, slot)
                pending = None
                if i + 1 < len(experts):
                    pending = self._start(tensors, experts[i + 1], 1 - slot)
                    held.append(1 - slot)
                yield expert, weights
                self._release(slot)
                held.remove(slot)
        finally:  # stopped early (an error in the caller's compute): let a read in flight finish first
            if pending is not None and self.prefetch:
                try:
                    pending.result()
                except Exception:  # noqa: BLE001 - the caller's error is the one to report
                    pass
            for slot in held:
                self._release(slot)


def _close(fd: int, executor: ThreadPoolExecutor) -> None:
    executor.shutdown(wait=True)
    os.close(fd)


# ----------------------------------------------------------------------------------------------
# The streaming MoE layer
# ----------------------------------------------------------------------------------------------
class StreamingMoE(MoE):
    """An eval-only ``MoE`` whose experts stay in the checkpoint file and are streamed two at a time.

    Built from a ``MoE`` (its router is taken over; its expert tensors are dropped) and the location of
    that layer's expert tensors in the file. Routing is ``MoE.route`` (so ``last_routing`` is set as by
    ``MoE.forward``); only the expert backend (``run_experts``) differs. ``last_loaded`` lists the
    experts read in the last forward.
    """

    compilable = False  # a reader thread and a generator over two shared buffers: eager only

    def __init__(self, moe: MoE, tensors: ExpertTensors, streamer: ExpertStreamer):
        # MoE.__init__ validates the options and builds a router; on meta nothing is allocated. Both the
        # stacked expert tensors and this throwaway router are then replaced. A layer holding a subset
        # of the experts (an extracted task) keeps its router width and its held expert ids.
        subset = {} if moe.expert_ids is None else {"expert_ids": moe.expert_ids}
        with TensorsOnMeta():
            super().__init__(moe.dim, moe.hidden_dim, moe.router_experts, moe.top_k, num_tasks=moe.num_tasks,
                             router=moe.router_kind, noise_std=moe.noise_std, renormalize=moe.renormalize,
                             capacity_factor=moe.capacity_factor, dispatch=moe.dispatch,
                             balance_loss=moe.balance_loss_kind, init=moe.init, **subset)
        for name in EXPERT_PARAMS:
            delattr(self, name)
        self.router = moe.router
        if tensors.num_experts != moe.num_experts:
            raise ValueError(f"{tensors.layer}: the file holds {tensors.num_experts} experts, the model config "
                             f"{moe.num_experts}")
        self.expert_tensors = tensors
        self.streamer = streamer
        self.last_loaded: tuple[int, ...] = ()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", streamed from file"

    def aux_loss(self) -> Tensor:
        """Always 0: a streaming layer never trains."""
        return torch.zeros((), device=self.streamer.device)

    def forward(self, x: Tensor, task_ids: int | Tensor = 0) -> Tensor:
        if self.training:
            raise RuntimeError("a streaming MoE layer runs in eval mode only: call model.eval() (its experts are "
                               "read from the checkpoint file and cannot be trained)")
        with torch.no_grad():
            return super().forward(x, task_ids)

    def run_experts(self, tokens: Tensor, routing: Routing) -> Tensor:
        """The streamed expert backend: each busy expert read from the file while the previous one computes."""
        plan = routing.plan
        device = tokens.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype
        tokens = tokens.to(dtype).contiguous()
        gate_col = queued_gates(routing.weights, plan).to(dtype).unsqueeze(1)
        out = torch.zeros_like(tokens)
        queues = {expert: (lo, hi) for expert, lo, hi in expert_queues(plan.counts)}
        # The same ops, in the same order, as the resident per-expert dispatch (nn.dispatch.ExpertMLP).
        with torch.autocast(device, enabled=False):
            with closing(self.streamer.stream(self.expert_tensors, list(queues))) as stream:
                for expert, w in stream:
                    w1, b1, w2, b2 = (t if t.dtype == dtype else t.to(dtype) for t in (w.w1, w.b1, w.w2, w.b2))
                    lo, hi = queues[expert]
                    tok = plan.token[lo:hi]
                    h = torch.ops.aten.gelu_(torch.addmm(b1, tokens.index_select(0, tok), w1))
                    y = torch.addmm(b2, h, w2)
                    y.mul_(gate_col[lo:hi])
                    out.index_add_(0, tok, y)
        self.last_loaded = tuple(queues)
        return out


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint for streaming
# ----------------------------------------------------------------------------------------------
def expert_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """``(resident bytes, expert bytes)`` of a model's parameters and buffers: expert bytes are the stacked
    ``w1/b1/w2/b2`` of its ``MoE`` layers (0 for a streaming model, whose experts are not in memory)."""
    expert_ids = set()
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module, StreamingMoE):
            expert_ids.update(id(getattr(module, n)) for n in EXPERT_PARAMS)
    total = expert = 0
    for t in list(model.parameters()) + list(model.buffers()):
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if id(t) in expert_ids:
            expert += nbytes
    return total, expert


def load_streaming_model(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                         prefetch: bool | None = None) -> MultiTaskModel:
    """The checkpoint's model, in eval mode, with its experts streamed from ``model.safetensors``.

    Same forward API as ``load_checkpoint``'s model; every MoE layer is a ``StreamingMoE`` sharing one
    ``ExpertStreamer`` (``model.expert_streamer``: its ``stats``, ``close()``). ``map_location`` is
    ``"cpu"`` or a CUDA device. ``prefetch=False`` reads each expert when needed, without overlap; ``True``
    reads the next one in the background; ``None`` (default) decides by ``default_prefetch`` (module docstring).
    The checkpoint is checked first by ``verify_checkpoint`` (header, sizes, config against weights), so no
    byte is read at an offset the header does not justify. Raises ``FileNotFoundError`` for a missing
    checkpoint, ``CheckpointError`` for a damaged one or weights that do not match ``config.yaml``, and
    ``InputError`` for a dense model (no experts to stream).
    """
    verified = verify_checkpoint(checkpoint_dir)
    directory, cfg, layout = verified.directory, verified.config, verified.layout
    if not cfg.is_moe:
        raise InputError(f"{directory}: model {cfg.name!r} is dense (no MoE layer); there are no experts to "
                         f"stream, load it normally")
    weights_path = verified.weights_path
    device = torch.device(map_location)

    model = build_on_meta(cfg)
    moe_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]
    w1 = layout[f"{moe_layers[0][0]}.w1"]
    streamer = ExpertStreamer(weights_path, cfg.embed_dim, cfg.expert_hidden, w1.dtype, device, prefetch=prefetch)
    try:
        for name, moe in moe_layers:
            entries = {p: layout[f"{name}.{p}"] for p in EXPERT_PARAMS}
            for p, entry in entries.items():  # shapes were verified; the two buffers need one dtype
                if entry.dtype != w1.dtype:
                    raise CheckpointError(f"{weights_path}: {name}.{p} is {entry.dtype}, the first expert tensor "
                                          f"{w1.dtype}; streaming needs every expert tensor in one dtype")
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr,
                    StreamingMoE(moe, ExpertTensors(layer=name, **entries), streamer))

        read_weights_into(model, verified, device)  # everything but the experts, which the layers dropped
    except BaseException:
        streamer.close()
        raise
    model.expert_streamer = streamer
    log.info("%s: streaming %d MoE layers' experts from %s (%d buffer bytes)", directory, len(moe_layers),
             weights_path, streamer.buffer_bytes)
    return model.eval()
