"""The task-level sparse mixture-of-experts MLP: routing (``MoE.route``), balance loss, expert backend.

Balance loss of one group of tokens (``balance_loss``): ``cv²(importance) + cv²(load)`` with ``cv²(v) =
var(v) / (mean(v)² + 1e-10)``. Two forms (``kind``):

* ``"reference"`` (the official M³ViT gate): importance = Σ over tokens of the *sparse* gate vector,
  the top-k combine weights scattered into zeros; ``var`` unbiased (N − 1); 0 for a single expert.
* ``"vmoe"``: importance = Σ of the full softmax probabilities; population ``var``.

Load is the number of (token, choice) pairs each expert receives, or with gate noise the smooth
in-top-k probability mass. Expert initialisation (``init``): ``"reference"`` draws ``w1`` and ``w2``
from ``U(±1/√(dim·hidden))`` (FastMoE's ``FMoELinear``: ``kaiming_uniform_(a=√5)`` on an
``[E, out, in]`` weight, fan-in out·in), so the experts start near zero; ``"trunc_normal"`` uses a
normal with std 0.02 truncated at ±2. Biases start at 0 either way; the gate follows ``init`` too
(``m3vit.nn.routers``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .dispatch import STRATEGIES, expert_capacity, moe_experts_op, run_experts
from .routers import (GATE_INITS, ROUTERS, Routing, TaskEmbedding, at_least_float32, build_router, prob_in_top_k,
                      top_k_gate)

__all__ = ["MoE", "Routing", "cv_squared", "top_k_gate", "balance_loss", "BALANCE_LOSSES", "MOE_INITS"]

#: Balance-loss forms (see the module docstring).
BALANCE_LOSSES = ("reference", "vmoe")
#: Expert and gate initialisations (see the module docstring).
MOE_INITS = GATE_INITS


def cv_squared(v: Tensor, unbiased: bool = False) -> Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + 1e-10)``.

    ``unbiased=False``: population variance; ``unbiased=True``: sample variance (N − 1), and 0 for a
    single value (the official M³ViT gate's convention).
    """
    v = at_least_float32(v)
    if unbiased and v.numel() < 2:
        return v.new_zeros(())
    return v.var(unbiased=unbiased) / (v.mean() ** 2 + 1e-10)


def balance_loss(probs: Tensor, indices: Tensor, load: Tensor | None = None, *, weights: Tensor | None = None,
                 kind: str = "vmoe", row_mask: Tensor | None = None) -> Tensor:
    """``cv^2(importance) + cv^2(load)`` over one group of tokens (see the module docstring).

    ``probs [S, E]`` are the gate's softmax probabilities, ``indices [S, k]`` the picked experts and
    ``weights [S, k]`` their combine weights (``kind="reference"``; default the picked probabilities).
    ``load`` is the smooth in-top-k probability ``[S, E]`` (noisy gating), else the hard count is used.
    ``row_mask`` (``BoolTensor[S]``, optional) takes the group as the masked rows without gathering them
    (static shapes, for ``torch.compile``; equal up to float summation order).
    """
    if kind not in BALANCE_LOSSES:
        raise ValueError(f"kind={kind!r} is not a balance loss; choose one of {list(BALANCE_LOSSES)}")
    row = None if row_mask is None else row_mask.to(probs.dtype).unsqueeze(1)  # [S, 1]
    if kind == "reference":
        picked = probs.gather(-1, indices) if weights is None else weights.to(probs.dtype)
        picked = picked if row is None else picked * row
        importance = torch.zeros_like(probs).scatter(-1, indices, picked).sum(0)
    else:
        importance = (probs if row is None else probs * row).sum(0)
    if load is not None:
        load = (load if row is None else load * row).sum(0)
    elif row is None and not torch.compiler.is_compiling():
        load = torch.bincount(indices.reshape(-1), minlength=probs.shape[-1]).to(probs.dtype)
    else:  # static shapes: a scatter-add of the (masked) choices
        ones = torch.ones_like(indices, dtype=probs.dtype) if row is None else row.expand(indices.shape)
        load = probs.new_zeros(probs.shape[-1]).scatter_add_(0, indices.reshape(-1), ones.reshape(-1))
    unbiased = kind == "reference"
    return cv_squared(importance, unbiased) + cv_squared(load, unbiased)


class MoE(nn.Module):
    """Sparse MoE MLP with task-dependent routing and expert-by-expert dispatch.

    Each expert is ``Linear(dim, hidden_dim) -> GELU -> Linear(hidden_dim, dim)``, stacked as
    ``w1 [E, dim, hidden]``, ``b1 [E, hidden]``, ``w2 [E, hidden, dim]``, ``b2 [E, dim]``.
    ``forward(x [B, N, dim], task_ids)`` with ``task_ids`` an int or ``LongTensor[B]`` (one task per
    image, tasks may differ within a batch). After a forward, ``last_routing`` holds detached
    ``indices [B*N, k]``, ``weights [B*N, k]``, ``probs [B*N, E]``, ``task_ids [B*N]``, the
    per-expert queue lengths ``counts`` and the number of ``dropped`` (token, choice) pairs.

    Router + expert backend: ``forward`` is ``route(x, task_ids)`` (a ``Routing``: the layer's one routing
    implementation) then ``run_experts(tokens, routing)``, the expert backend: resident here (the
    ``dispatch`` strategies of ``m3vit.nn.dispatch``), streamed from the checkpoint file in
    ``m3vit.efficiency.streaming.StreamingMoE``, the traceable form in ``m3vit.efficiency.onnx_export``.
    ``extract_task_state`` gives the layer reduced to one task and a subset of its experts.

    The balance loss (``aux_loss()``, training only) is computed per task present in the batch and
    summed, so a task-batched forward gives the sum of the per-task forwards' losses; a shared
    router treats the whole batch as one group.

    ``expert_ids`` (default: all) makes a layer that holds only those of the router's
    ``num_experts`` experts (an extracted single-task layer, ``m3vit.efficiency.export``): the router
    still scores every expert and the softmax runs over all of them, so a held expert's combine
    weight is what it was in the full layer, but top-k picks among the held ones only. Then
    ``num_experts`` is the number held (``w1.shape[0]``), ``router_experts`` the router's width, and
    ``last_routing`` indices and probs refer to the held experts.

    ``balance_loss`` and ``init`` choose the loss form and the initialisation (module docstring);
    ``task_embed`` hands a task-conditioned router the model's shared ``TaskEmbedding``.
    """

    #: ``torch.compile`` can compile this layer (``m3vit.nn.compile.compile_model``); a streaming layer cannot.
    compilable = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        num_tasks: int = 1,
        router: str = "multi_gate",
        noise_std: float = 0.0,
        task_embed_dim: int = 64,
        renormalize: bool = False,
        capacity_factor: float | None = None,
        dispatch: str = "auto",
        expert_ids: Sequence[int] | None = None,
        balance_loss: str = "vmoe",
        init: str = "trunc_normal",
        task_embed: TaskEmbedding | None = None,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        router_experts = num_experts
        if expert_ids is not None:
            expert_ids = tuple(int(e) for e in expert_ids)
            increasing = list(expert_ids) == sorted(set(expert_ids))
            if not expert_ids or not increasing or not 0 <= expert_ids[0] <= expert_ids[-1] < num_experts:
                raise ValueError(f"expert_ids must be distinct increasing ids in [0, {num_experts}), "
                                 f"got {list(expert_ids)}")
            num_experts = len(expert_ids)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got top_k={top_k}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is not a router kind; choose one of {sorted(ROUTERS)}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        if dispatch not in STRATEGIES:
            raise ValueError(f"dispatch={dispatch!r} is not a dispatch strategy; choose one of {list(STRATEGIES)}")
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss={balance_loss!r} is not allowed; choose one of {list(BALANCE_LOSSES)}")
        if init not in MOE_INITS:
            raise ValueError(f"init={init!r} is not allowed; choose one of {list(MOE_INITS)}")
        self.dispatch = dispatch
        self.balance_loss_kind, self.init = balance_loss, init
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k, self.num_tasks = num_experts, top_k, num_tasks
        self.noise_std, self.renormalize, self.capacity_factor = noise_std, renormalize, capacity_factor
        self.router_kind = router
        self.router_experts, self.expert_ids = router_experts, expert_ids
        self.router = build_router(router, dim, router_experts, num_tasks, task_embed_dim, task_embed=task_embed,
                                   init=init)
        # Non-persistent: rebuilt from the config, so the state dict of a full layer is unchanged.
        self.register_buffer("_selectable", None if expert_ids is None else torch.tensor(expert_ids), persistent=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_experts()
        # (indices, weights, probs, task ids, counts, dropped) of the last forward; ``last_routing`` reads it.
        self._routing_record: tuple | dict | None = None
        self._aux_loss: Tensor | None = None

    @property
    def last_routing(self) -> dict | None:
        """Detached routing of the last forward (see the class docstring), None before any forward."""
        record = self._routing_record
        if record is None or isinstance(record, dict):
            return record
        indices, weights, probs, token_tasks, counts, dropped = record
        if isinstance(counts, Tensor):  # recorded by the compiled dispatch op: read on the host only now
            counts, dropped = tuple(counts.tolist()), int(dropped)
        record = {"indices": indices, "weights": weights, "probs": probs, "task_ids": token_tasks,
                  "counts": counts, "dropped": dropped}
        self._routing_record = record
        return record

    def reset_experts(self) -> None:
        """Initialise the experts per ``self.init`` (biases 0; see the module docstring)."""
        with torch.no_grad():
            if self.init == "reference":
                bound = 1.0 / math.sqrt(self.dim * self.hidden_dim)
                self.w1.uniform_(-bound, bound)
                self.w2.uniform_(-bound, bound)
            else:
                nn.init.trunc_normal_(self.w1, std=0.02)
                nn.init.trunc_normal_(self.w2, std=0.02)
            self.b1.zero_()
            self.b2.zero_()

    @property
    def task_dependent(self) -> bool:
        return self.router.task_dependent

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, num_tasks={self.num_tasks}, router={self.router_kind!r}, "
            f"noise_std={self.noise_std}, balance_loss={self.balance_loss_kind!r}, init={self.init!r}"
            + ("" if self.expert_ids is None else f", expert_ids={list(self.expert_ids)} of {self.router_experts}")
        )

    def _task_ids(self, task_ids: int | Tensor, batch: int, device: torch.device) -> int | Tensor:
        """Checked task ids: an ``int`` stays one (one task for the batch, checked on the host), a tensor
        becomes ``LongTensor[batch]`` (a one-element tensor is broadcast)."""
        if isinstance(task_ids, int) and not isinstance(task_ids, bool):
            if not 0 <= task_ids < self.num_tasks:  # checked on the host: no device sync
                raise ValueError(f"task ids must lie in [0, {self.num_tasks}), got [{task_ids}]")
            return task_ids
        if not isinstance(task_ids, Tensor):
            raise TypeError(f"task_ids must be an int or a LongTensor[B], got {type(task_ids).__name__}")
        task_ids = task_ids.to(device=device, dtype=torch.long).reshape(-1)
        if task_ids.numel() == 1 and batch != 1:
            task_ids = task_ids.expand(batch)
        if task_ids.numel() != batch:
            raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {batch} images")
        if torch.compiler.is_compiling():  # checked on the device: no graph break
            torch._assert_async(((task_ids >= 0) & (task_ids < self.num_tasks)).all(),
                                f"task ids must lie in [0, {self.num_tasks})")
            return task_ids
        # One host sync, and an empty batch (no ids) passes.
        if bool(((task_ids < 0) | (task_ids >= self.num_tasks)).any()):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}), got {task_ids.unique().tolist()}")
        return task_ids

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects x of shape [B, N, {self.dim}], got {list(x.shape)}")

    def route(self, x: Tensor, task_ids: int | Tensor = 0) -> Routing:
        """Route tokens ``x [B, N, dim]`` of images with tasks ``task_ids``: the layer's one routing
        implementation (router logits, gate noise in training, softmax, top-k over the held experts,
        the smooth load of noisy gating), used by every expert backend (resident, streamed, exported)."""
        self._check_input(x)
        batch, num_tokens, _ = x.shape
        num_rows = batch * num_tokens
        task_ids = self._task_ids(task_ids, batch, x.device)
        logits = at_least_float32(self.router(x, task_ids).reshape(num_rows, self.router_experts))

        noisy = self.training and self.noise_std > 0
        noise_scale = self.noise_std / self.router_experts
        gate_logits = logits + torch.randn_like(logits) * noise_scale if noisy else logits
        probs, weights, indices = top_k_gate(gate_logits, self.top_k, self.renormalize, self._selectable)
        load = None
        if noisy:
            held = (lambda t: t) if self._selectable is None else (lambda t: t.index_select(-1, self._selectable))
            load = prob_in_top_k(held(logits), held(gate_logits), self.top_k, noise_scale)

        if isinstance(task_ids, int):
            task, token_tasks = task_ids, torch.full((num_rows,), task_ids, dtype=torch.long, device=x.device)
        else:
            task, token_tasks = None, task_ids.repeat_interleave(num_tokens)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(num_rows, self.top_k, self.num_experts, self.capacity_factor)
        return Routing(indices=indices, weights=weights, probs=probs, token_tasks=token_tasks, task=task,
                       num_experts=self.num_experts, capacity=capacity, load=load)

    def run_experts(self, tokens: Tensor, routing: Routing) -> Tensor:
        """The expert backend: tokens ``[S, dim]`` through their routed experts, combined, ``[S, dim]``.
        Here the experts are resident (``nn.dispatch.run_experts`` with this layer's ``dispatch``);
        ``efficiency.streaming.StreamingMoE`` reads them from the checkpoint file instead. Under
        ``torch.compile`` the dispatch runs as the op ``m3vit::moe_experts`` (no graph break)."""
        experts = (self.w1, self.b1, self.w2, self.b2)
        if torch.compiler.is_compiling():
            return self._run_experts_op(tokens, routing, experts)
        return run_experts(tokens, routing.plan, routing.weights, *experts, strategy=self.dispatch)

    def _run_experts_op(self, tokens: Tensor, routing: Routing, experts: tuple[Tensor, ...]) -> Tensor:
        device = tokens.device.type
        if torch.is_autocast_enabled(device):  # as run_experts: the experts in the autocast dtype
            dtype = torch.get_autocast_dtype(device)
            tokens, experts = tokens.to(dtype), tuple(t.to(dtype) for t in experts)
        with torch.autocast(device, enabled=False):
            out, counts, dropped = moe_experts_op(tokens, routing.indices, routing.weights, *experts,
                                                  routing.capacity, self.dispatch)
        routing.queue_counts, routing.queue_dropped = counts, dropped
        return out

    def forward(self, x: Tensor, task_ids: int | Tensor = 0) -> Tensor:
        routing = self.route(x, task_ids)
        batch, num_tokens, _ = x.shape
        out = self.run_experts(x.reshape(batch * num_tokens, self.dim), routing)
        counts, dropped = routing.queue_stats()
        detached = (t.detach() if t.requires_grad else t for t in (routing.indices, routing.weights, routing.probs))
        # Plain attributes, set through __dict__: nn.Module.__setattr__'s parameter/buffer/module checks
        # cost more than the rest of this bookkeeping.
        self.__dict__["_aux_loss"] = self.routing_loss(routing) if self.training else None
        self.__dict__["_routing_record"] = (*detached, routing.token_tasks, counts, dropped)
        return out.reshape(batch, num_tokens, self.dim)

    def routing_loss(self, routing: Routing) -> Tensor:
        """The balance loss of ``routing``: per task present (task-dependent routers), summed."""
        kind = self.balance_loss_kind
        probs, indices, weights, load = routing.probs, routing.indices, routing.weights, routing.load
        if not self.task_dependent or routing.task is not None:
            tasks = [None]
        elif torch.compiler.is_compiling():  # no host sync: every task, as masked rows (absent ones add 0)
            return sum((balance_loss(probs, indices, load, weights=weights, kind=kind,
                                     row_mask=routing.token_tasks == task) for task in range(self.num_tasks)),
                       probs.new_zeros(()))
        else:
            tasks = routing.token_tasks.unique().tolist()
        if len(tasks) == 1:
            return balance_loss(probs, indices, load, weights=weights, kind=kind)
        token_tasks = routing.token_tasks
        total = probs.new_zeros(())
        for task in tasks:
            rows = (token_tasks == task).nonzero().squeeze(1)
            group_load = None if load is None else load.index_select(0, rows)
            total = total + balance_loss(probs.index_select(0, rows), indices.index_select(0, rows), group_load,
                                         weights=weights.index_select(0, rows), kind=kind)
        return total

    def extract_task_state(self, task_index: int, experts: list[int] | None = None,
                           gate_softmax: str = "all") -> dict[str, Tensor]:
        """State dict entries (relative to the layer) of this layer reduced to task ``task_index`` and the
        ``experts`` it keeps (default all): their ``w1/b1/w2/b2`` rows and the router's one-task state;
        ``gate_softmax="kept"`` also drops the removed experts' gate rows (``m3vit.efficiency.export``)."""
        idx = None if experts is None else torch.tensor(experts, dtype=torch.long, device=self.w1.device)
        state = {}
        for name in ("w1", "b1", "w2", "b2"):
            weight = getattr(self, name).detach()
            state[name] = weight if idx is None else weight.index_select(0, idx)
        rows = idx if gate_softmax == "kept" else None
        state.update({f"router.{k}": v for k, v in self.router.extract_task_state(task_index, rows).items()})
        return state

    def aux_loss(self) -> Tensor:
        """Balance loss of the last training forward; 0 in eval mode or before any forward."""
        if self._aux_loss is None:
            return self.w1.new_zeros(())
        return self._aux_loss

