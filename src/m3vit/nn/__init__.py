"""Building blocks: attention, dense MLP, the task-level MoE and its dispatch, routers, decoder heads."""

from .dispatch import DispatchPlan, dispatch_to_experts, expert_capacity, plan_dispatch
from .heads import SETRPUPHead
from .layers import Attention, Block, DropPath, Mlp
from .moe import MoE, balance_loss, cv_squared, top_k_gate
from .routers import ROUTERS, MultiGateRouter, SharedRouter, TaskConditionedRouter, build_router

__all__ = [
    "Attention", "Block", "DropPath", "Mlp", "MoE", "SETRPUPHead",
    "DispatchPlan", "dispatch_to_experts", "expert_capacity", "plan_dispatch",
    "balance_loss", "cv_squared", "top_k_gate",
    "ROUTERS", "MultiGateRouter", "SharedRouter", "TaskConditionedRouter", "build_router",
]
