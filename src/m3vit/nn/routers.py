"""Routers of the task-level MoE: per-task gates, one task-conditioned gate, or one shared gate, and
the top-k gate that turns their logits into a ``Routing``.

A router maps tokens ``[B, N, D]`` and their images' task ids (a ``LongTensor[B]``, or one ``int`` for
the whole batch: no device sync, and a form ``torch.export`` / ``torch.compile`` trace) to gate logits
``[B, N, E]``. ``task_dependent`` tells the model whether different tasks can route the same token
differently (and so whether a multi-task forward needs one backbone copy per task).
``extract_task_state(task, experts)`` gives the state of the same router reduced to one task (and
optionally to a subset of the experts' gate rows): what ``m3vit export`` writes.

A ``Routing`` (built by ``MoE.route``, the one routing implementation) is what every expert backend
consumes: the top-k ``indices``/``weights``, the softmax ``probs``, each token's task, the smooth load
of noisy gating, and the dispatch plan (sorted per-expert queues), computed when first asked for.

Gate initialisation (``init``): ``"trunc_normal"`` draws every gate weight from a normal with std
0.02 truncated at ±2; ``"reference"`` draws it from ``U(-1/√E, 1/√E)`` (E experts), as the official
M³ViT gate does (``kaiming_uniform_(a=√5)`` on its ``[D, E]`` weight, whose fan-in PyTorch takes
from E), so routing starts sharp (see ``docs/reference.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from .dispatch import DispatchPlan, plan_dispatch

__all__ = ["ROUTERS", "GATE_INITS", "MultiGateRouter", "TaskConditionedRouter", "SharedRouter", "TaskEmbedding",
           "build_router", "init_gate_", "Routing", "top_k_gate", "prob_in_top_k"]

GATE_INITS = ("reference", "trunc_normal")


def at_least_float32(t: Tensor) -> Tensor:
    """Upcast half-precision tensors for the gate's softmax and statistics; keep float64 as is."""
    if t.dtype == torch.float32 or t.dtype == torch.float64:  # nothing to do: not even a dispatched no-op
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32))


def top_k_gate(logits: Tensor, top_k: int, renormalize: bool = False,
               selectable: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over all experts, then keep the ``top_k`` largest: returns ``probs, weights, indices``.

    The combine weights are the picked probabilities themselves (V-MoE); ``renormalize`` rescales
    them to sum to one per token. ``selectable`` (``LongTensor[E']``, optional) restricts the pick to
    those logit columns after the softmax over all of them: ``probs`` is then ``[S, E']`` and
    ``indices`` index into ``selectable``.
    """
    probs = torch.softmax(at_least_float32(logits), dim=-1)
    if selectable is not None:
        probs = probs.index_select(-1, selectable)
    weights, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, indices


def prob_in_top_k(clean: Tensor, noisy: Tensor, top_k: int, noise_scale: float) -> Tensor:
    """Smooth estimate ``P(expert e is in the top-k | the other experts' noise)`` per token, ``[S, E]``.

    For expert e the threshold is the k-th largest noisy logit among the *other* experts: the
    (k+1)-th largest overall when e is itself in the noisy top-k, else the k-th largest.
    """
    num_experts = clean.shape[-1]
    if top_k >= num_experts:
        return torch.ones_like(clean)
    top_vals = noisy.topk(top_k + 1, dim=-1).values
    kth, kth_plus_one = top_vals[:, top_k - 1 : top_k], top_vals[:, top_k : top_k + 1]
    threshold = torch.where(noisy >= kth, kth_plus_one, kth)
    return torch.special.ndtr((clean - threshold) / noise_scale)


@dataclass(eq=False)
class Routing:
    """Where the tokens ``[S = B*N, D]`` of one MoE forward go: what every expert backend consumes.

    ``indices [S, k]`` (into the layer's held experts), ``weights [S, k]`` (combine weights),
    ``probs [S, E]`` (softmax over the held experts' columns), ``token_tasks [S]`` (each token's task),
    ``task`` (the one task of the batch when it was given as an ``int``, else None), ``load [S, E]``
    (the smooth in-top-k probability of noisy training, the balance loss's load term; else None),
    ``num_experts`` held and the per-expert ``capacity`` (None: dropless). ``plan`` sorts the choices
    into per-expert queues on first use (a host sync: backends that do not need it never pay it).
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    token_tasks: Tensor
    task: int | None
    num_experts: int
    capacity: int | None = None
    load: Tensor | None = None

    #: Queue lengths ``LongTensor[E]`` and dropped pairs (0-dim) when a backend computed them without
    #: building ``plan`` on the host (the compiled dispatch op); read them through ``queue_stats``.
    queue_counts: Tensor | None = None
    queue_dropped: Tensor | None = None

    @cached_property
    def plan(self) -> DispatchPlan:
        return plan_dispatch(self.indices, self.num_experts, self.capacity)

    def queue_stats(self) -> tuple[tuple[int, ...] | Tensor, int | Tensor]:
        """``(counts, dropped)`` of the dispatch: the plan's, or the tensors a backend recorded (no sync)."""
        if self.queue_counts is not None:
            return self.queue_counts, self.queue_dropped
        return self.plan.counts, self.plan.dropped


def init_gate_(weight: Tensor, num_experts: int, init: str) -> Tensor:
    """Fill a gate weight in place: ``U(±1/√num_experts)`` (``"reference"``) or trunc-normal std 0.02."""
    if init not in GATE_INITS:
        raise ValueError(f"init={init!r} is not a gate initialisation; choose one of {list(GATE_INITS)}")
    with torch.no_grad():
        if init == "reference":
            bound = 1.0 / math.sqrt(num_experts)
            return weight.uniform_(-bound, bound)
        return nn.init.trunc_normal_(weight, std=0.02)


class TaskEmbedding(nn.Sequential):
    """The learned task embedding of task-conditioned routing: ``one-hot(T) -> Linear(T, d) -> GELU ->
    Linear(d, d) -> LayerNorm(d)``. ``embeddings()`` gives every task's embedding, ``[T, d]``.

    One instance per model is the official layout (``ModelConfig.task_embed = "model"``): it is built
    by the backbone and handed to every MoE layer's router, which uses it without owning it.
    """

    def __init__(self, num_tasks: int, dim: int, eps: float = 1e-5):
        super().__init__(nn.Linear(num_tasks, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps))
        self.num_tasks, self.dim = num_tasks, dim

    def embeddings(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
        weight = self[0].weight
        one_hot = torch.eye(self.num_tasks, device=device or weight.device, dtype=dtype or weight.dtype)
        return self(one_hot)

    def task_input_weight(self, task_index: int) -> Tensor:
        """The first layer's weight of this embedding reduced to one task (its one-hot is then ``[1]``):
        task ``task_index``'s column, so the one-task embedding equals this one's for that task."""
        return self[0].weight.detach()[:, task_index:task_index + 1]

    def reset_parameters(self) -> None:
        """Trunc-normal (std 0.02) Linear weights, zero biases, LayerNorm 1 / 0 (the ViT's own rule)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class MultiGateRouter(nn.Module):
    """One bias-free linear gate per task (the paper's "multi-gate"); stacked as ``weight [T, E, D]``."""

    task_dependent = True

    def __init__(self, dim: int, num_experts: int, num_tasks: int, init: str = "trunc_normal"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, num_experts, dim))
        self.reset_gate(init)

    def reset_gate(self, init: str) -> None:
        init_gate_(self.weight, self.weight.shape[1], init)

    def forward(self, x: Tensor, task_ids: Tensor | int) -> Tensor:
        if isinstance(task_ids, int):  # one task, known on the host: no branch on data
            return nn.functional.linear(x, self.weight[task_ids])  # = x @ weight.t(), one op fewer
        if task_ids.numel() == 0:  # an empty batch: [0, N, E] logits
            return x @ self.weight[0].t()
        if not torch.compiler.is_compiling() and bool((task_ids == task_ids[0]).all()):  # compiled: no sync
            return x @ self.weight[task_ids[0]].t()
        return torch.bmm(x, self.weight.index_select(0, task_ids).transpose(1, 2))

    def extract_task_state(self, task_index: int, experts: Tensor | None = None) -> dict[str, Tensor]:
        """State of the one-task router: task ``task_index``'s gate (only the ``experts`` rows when given)."""
        gate = self.weight.detach()[task_index:task_index + 1]
        return {"weight": gate if experts is None else gate.index_select(1, experts)}


class TaskConditionedRouter(nn.Module):
    """One gate over ``[token ; task embedding]``, the embedding an MLP of the task's one-hot.

    ``task_embed`` (a ``TaskEmbedding``) is the model's shared embedding: the router uses it but does
    not own it (it is not in the router's state dict). Without one the router builds and owns its own
    (``self.task_embed``, m3vit's earlier per-layer layout).

    The embedding of every task is computed once per forward; the gate's task half then adds a
    per-task logit offset, which equals applying the gate to the concatenation.
    """

    task_dependent = True

    def __init__(self, dim: int, num_experts: int, num_tasks: int, task_embed_dim: int = 64,
                 task_embed: TaskEmbedding | None = None, init: str = "trunc_normal"):
        super().__init__()
        self.dim = dim
        self.num_tasks = num_tasks
        if task_embed is None:
            self.task_embed = TaskEmbedding(num_tasks, task_embed_dim)
        else:
            if task_embed.num_tasks != num_tasks:
                raise ValueError(f"the shared task embedding covers {task_embed.num_tasks} tasks, "
                                 f"the router {num_tasks}")
            task_embed_dim = task_embed.dim
            # Not registered: the model owns the shared embedding (one copy in its state dict).
            object.__setattr__(self, "_shared_task_embed", task_embed)
        self.gate = nn.Linear(dim + task_embed_dim, num_experts, bias=False)
        self.reset_gate(init)

    @property
    def shares_task_embed(self) -> bool:
        return "_shared_task_embed" in self.__dict__

    @property
    def embedding(self) -> TaskEmbedding:
        """The task embedding this router uses (its own, or the model's shared one)."""
        return self.__dict__["_shared_task_embed"] if self.shares_task_embed else self.task_embed

    def reset_gate(self, init: str) -> None:
        init_gate_(self.gate.weight, self.gate.weight.shape[0], init)

    def forward(self, x: Tensor, task_ids: Tensor | int) -> Tensor:
        task_offsets = self.embedding.embeddings(x.device, x.dtype) @ self.gate.weight[:, self.dim :].t()  # [T, E]
        token_logits = x @ self.gate.weight[:, : self.dim].t()  # [B, N, E]
        if isinstance(task_ids, int):  # the same ops as a tensor of ids (gradients summed in the same order)
            task_ids = torch.full((x.shape[0],), task_ids, dtype=torch.long, device=x.device)
        return token_logits + task_offsets.index_select(0, task_ids).unsqueeze(1)

    def extract_task_state(self, task_index: int, experts: Tensor | None = None) -> dict[str, Tensor]:
        """State of the one-task router: the gate (only the ``experts`` rows when given) and, when the router
        owns its embedding, that embedding with its one-hot input reduced to task ``task_index``'s column
        (a shared embedding is the model's to reduce: ``TaskEmbedding.task_input_weight``)."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if not self.shares_task_embed:
            state["task_embed.0.weight"] = self.task_embed.task_input_weight(task_index)
        gate = self.gate.weight.detach()
        state["gate.weight"] = gate if experts is None else gate.index_select(0, experts)
        return state


class SharedRouter(nn.Module):
    """One task-agnostic bias-free linear gate (the ablation)."""

    task_dependent = False

    def __init__(self, dim: int, num_experts: int, num_tasks: int = 1, init: str = "trunc_normal"):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.reset_gate(init)

    def reset_gate(self, init: str) -> None:
        init_gate_(self.gate.weight, self.gate.weight.shape[0], init)

    def forward(self, x: Tensor, task_ids: Tensor | int) -> Tensor:
        return self.gate(x)

    def extract_task_state(self, task_index: int, experts: Tensor | None = None) -> dict[str, Tensor]:
        """State of the one-task router: the same gate (only the ``experts`` rows when given)."""
        gate = self.gate.weight.detach()
        return {"gate.weight": gate if experts is None else gate.index_select(0, experts)}


ROUTERS = {
    "multi_gate": MultiGateRouter,
    "task_conditioned": TaskConditionedRouter,
    "shared": SharedRouter,
}


def build_router(kind: str, dim: int, num_experts: int, num_tasks: int, task_embed_dim: int = 64,
                 task_embed: TaskEmbedding | None = None, init: str = "trunc_normal") -> nn.Module:
    """A router of ``kind``; ``task_embed`` (task-conditioned only) is a shared ``TaskEmbedding``."""
    if kind not in ROUTERS:
        raise ValueError(f"router={kind!r} is not a router kind; choose one of {sorted(ROUTERS)}")
    if init not in GATE_INITS:
        raise ValueError(f"init={init!r} is not a gate initialisation; choose one of {list(GATE_INITS)}")
    if kind == "task_conditioned":
        return TaskConditionedRouter(dim, num_experts, num_tasks, task_embed_dim, task_embed=task_embed, init=init)
    if task_embed is not None:
        raise ValueError(f"a shared task embedding is for the task-conditioned router, not {kind!r}")
    return ROUTERS[kind](dim, num_experts, num_tasks, init=init)
