"""Routers of the task-level MoE: per-task gates, one task-conditioned gate, or one shared gate.

A router maps tokens ``[B, N, D]`` and their images' task ids ``[B]`` to gate logits ``[B, N, E]``.
``task_dependent`` tells the model whether different tasks can route the same token differently
(and so whether a multi-task forward needs one backbone copy per task).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ROUTERS", "MultiGateRouter", "TaskConditionedRouter", "SharedRouter", "build_router"]


class MultiGateRouter(nn.Module):
    """One bias-free linear gate per task (the paper's "multi-gate"); stacked as ``weight [T, E, D]``."""

    task_dependent = True

    def __init__(self, dim: int, num_experts: int, num_tasks: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        if task_ids.numel() == 0:  # an empty batch: [0, N, E] logits
            return x @ self.weight[0].t()
        if bool((task_ids == task_ids[0]).all()):
            return x @ self.weight[task_ids[0]].t()
        return torch.bmm(x, self.weight.index_select(0, task_ids).transpose(1, 2))


class TaskConditionedRouter(nn.Module):
    """One gate over ``[token ; task embedding]``, the embedding an MLP of the task's one-hot.

    The embedding of every task is computed once per forward; the gate's task half then adds a
    per-task logit offset, which equals applying the gate to the concatenation.
    """

    task_dependent = True

    def __init__(self, dim: int, num_experts: int, num_tasks: int, task_embed_dim: int = 64):
        super().__init__()
        self.dim = dim
        self.num_tasks = num_tasks
        self.task_embed = nn.Sequential(
            nn.Linear(num_tasks, task_embed_dim),
            nn.GELU(),
            nn.Linear(task_embed_dim, task_embed_dim),
            nn.LayerNorm(task_embed_dim),
        )
        self.gate = nn.Linear(dim + task_embed_dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        one_hot = torch.eye(self.num_tasks, device=x.device, dtype=x.dtype)
        task_offsets = self.task_embed(one_hot) @ self.gate.weight[:, self.dim :].t()  # [T, E]
        token_logits = x @ self.gate.weight[:, : self.dim].t()  # [B, N, E]
        return token_logits + task_offsets.index_select(0, task_ids).unsqueeze(1)


class SharedRouter(nn.Module):
    """One task-agnostic bias-free linear gate (the ablation)."""

    task_dependent = False

    def __init__(self, dim: int, num_experts: int, num_tasks: int = 1):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        return self.gate(x)


ROUTERS = {
    "multi_gate": MultiGateRouter,
    "task_conditioned": TaskConditionedRouter,
    "shared": SharedRouter,
}


def build_router(kind: str, dim: int, num_experts: int, num_tasks: int, task_embed_dim: int = 64) -> nn.Module:
    if kind not in ROUTERS:
        raise ValueError(f"router={kind!r} is not a router kind; choose one of {sorted(ROUTERS)}")
    if kind == "task_conditioned":
        return TaskConditionedRouter(dim, num_experts, num_tasks, task_embed_dim)
    return ROUTERS[kind](dim, num_experts, num_tasks)
