"""Building blocks: attention, dense MLP, the task-level MoE and its dispatch, routers, decoder heads."""

from .compile import compile_model
from .dispatch import DispatchPlan, dispatch_to_experts, expert_capacity, plan_dispatch, run_experts
from .heads import CrossTaskHead, SETRPUPHead
from .layers import Attention, Block, DropPath, Mlp
from .moe import BALANCE_LOSSES, MOE_INITS, MoE, balance_loss, cv_squared, top_k_gate
from .routers import ROUTERS, MultiGateRouter, Routing, SharedRouter, TaskConditionedRouter, TaskEmbedding, build_router

__all__ = [
    "compile_model",
    "Attention", "Block", "DropPath", "Mlp", "MoE", "SETRPUPHead", "CrossTaskHead",
    "DispatchPlan", "dispatch_to_experts", "expert_capacity", "plan_dispatch", "run_experts", "Routing",
    "BALANCE_LOSSES", "MOE_INITS", "balance_loss", "cv_squared", "top_k_gate",
    "ROUTERS", "MultiGateRouter", "SharedRouter", "TaskConditionedRouter", "TaskEmbedding", "build_router",
]
