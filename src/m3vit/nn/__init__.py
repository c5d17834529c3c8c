"""Building blocks: attention, dense MLP, the task-level MoE and its dispatch, routers, decoder heads."""

from .dispatch import DispatchPlan, dispatch_to_experts, expert_capacity, plan_dispatch
from .heads import CrossTaskHead, SETRPUPHead
from .layers import Attention, Block, DropPath, Mlp
from .moe import BALANCE_LOSSES, MOE_INITS, MoE, balance_loss, cv_squared, top_k_gate
from .routers import ROUTERS, MultiGateRouter, SharedRouter, TaskConditionedRouter, TaskEmbedding, build_router

__all__ = [
    "Attention", "Block", "DropPath", "Mlp", "MoE", "SETRPUPHead", "CrossTaskHead",
    "DispatchPlan", "dispatch_to_experts", "expert_capacity", "plan_dispatch",
    "BALANCE_LOSSES", "MOE_INITS", "balance_loss", "cv_squared", "top_k_gate",
    "ROUTERS", "MultiGateRouter", "SharedRouter", "TaskConditionedRouter", "TaskEmbedding", "build_router",
]
