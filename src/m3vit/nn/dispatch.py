"""Expert-by-expert MoE dispatch: the paper's computation reordering as a PyTorch op.

Every token is routed first; the (token, choice) pairs are then sorted into one contiguous queue per
expert, and every expert with a non-empty queue runs once over its whole queue. An expert whose queue
is empty is never read. Two ways to run the queues, chosen by queue length (``strategy="auto"``):

* ``"per_expert"`` (long queues): one expert at a time: gather its tokens, ``Linear -> GELU ->
  Linear``, scale by the combine weights, scatter-add back. The activations of one queue stay hot in
  cache (the CPU analogue of holding two experts on chip), which brings it close to a dense MLP of
  the same active FLOPs (see BENCHMARKS.md). Forward and backward are written out by hand (``ExpertMLP``) so the backward
  also runs expert by expert, writing straight into the stacked weight gradients.
* ``"batched"`` (short, even queues, where per-GEMM overhead dominates): the non-empty queues are padded to
  the longest one and all run in one batched GEMM pair (``baddbmm``); padding rows carry a zero
  combine weight, but they are computed, so FLOPs include them.

``moe_experts_op`` (``torch.ops.m3vit.moe_experts``) is the whole dispatch registered as one custom op with
a fake implementation, so ``torch.compile`` compiles the routing around it without a graph break.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch_to_experts", "run_experts", "expert_queues", "queued_gates",
           "moe_experts_op", "expert_capacity", "choose_strategy", "STRATEGIES"]

STRATEGIES = ("auto", "per_expert", "batched")
# "auto" runs the queues batched while a mean queue (rows per busy expert) is under
# BATCHED_MAX_MEAN_QUEUE rows and the longest queue, which every queue is padded to, is at most
# BATCHED_MAX_SKEW times the mean plus the rows that a per-expert GEMM call's fixed cost is worth,
# BATCHED_PADDING_MACS / (D x H): padding is cheap at small widths and short queues, where the per-expert
# path's ~6 ops per expert dominate, and dear at large widths or with a trained router's uneven queues.
# Fitted on three ``benchmarks/moe_dispatch.py --crossover`` sweeps (widths 96-768, mean queues 8-256,
# routing skews 0-2, 16 and 64 experts; 2 CPU threads; 150 points) and checked on a fourth run (72
# points): its worst pick costs 1.31x the faster strategy there (the previous rule, by mean queue and
# width alone: 1.71x), and it keeps m3vit_base E64 at 512x512 (mean 64 rows, longest 130-310) on the
# per-expert path (per-expert 2719 ms, batched 4127 ms; BENCHMARKS.md).
BATCHED_MAX_MEAN_QUEUE = 160
BATCHED_MAX_SKEW = 1.5
BATCHED_PADDING_MACS = 3_000_000


@dataclass(frozen=True)
class DispatchPlan:
    """Where every kept (token, choice) pair goes, sorted into per-expert queues.

    ``token[i]``, ``expert[i]`` and ``slot[i]`` name the token, the expert and the flat ``[S*k]``
    choice index (choice-major: ``slot = j * S + s``) of the i-th queued pair; ``counts[e]`` is the
    length of expert e's queue; the queues are contiguous in expert order. ``dropped`` counts pairs
    over capacity.
    """

    token: Tensor
    expert: Tensor
    slot: Tensor
    counts: tuple[int, ...]
    dropped: int


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert queue length allowed by ``capacity_factor`` (GShard convention)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def plan_dispatch(indices: Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the ``[S, k]`` expert choices into contiguous per-expert queues.

    Pairs are ordered choice-major before the stable sort, so within a queue every token's first
    choice precedes any second choice: with a ``capacity`` the pairs dropped are the lowest-ranked
    choices first, then later tokens.
    """
    num_tokens = indices.shape[0]
    flat = indices.t().reshape(-1)
    slot = torch.argsort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=num_experts)
    if counts_t.numel() > num_experts:
        raise ValueError(f"expert indices must lie in [0, {num_experts}), got {int(flat.max())}")
    expert = flat.index_select(0, slot)
    dropped = 0
    if capacity is not None:
        keep = _queue_position(expert, counts_t) < capacity
        dropped = int(slot.numel() - int(keep.sum()))
        if dropped:
            slot, expert = slot[keep], expert[keep]
        counts_t = counts_t.clamp(max=capacity)
    token = slot % num_tokens
    return DispatchPlan(token=token, expert=expert, slot=slot, counts=tuple(counts_t.tolist()), dropped=dropped)


def choose_strategy(plan: DispatchPlan, dim: int, hidden: int) -> str:
    """What ``strategy="auto"`` runs for this plan and experts ``dim -> hidden -> dim``: ``"batched"`` when
    a mean queue is short (under ``BATCHED_MAX_MEAN_QUEUE`` rows) and the longest queue, to which batched
    pads every other, is at most ``BATCHED_MAX_SKEW`` x the mean + ``BATCHED_PADDING_MACS / (dim x hidden)``
    rows; else ``"per_expert"`` (also for an empty plan: nothing runs)."""
    busy = sum(1 for c in plan.counts if c)
    pairs = plan.token.numel()
    if busy == 0 or pairs >= BATCHED_MAX_MEAN_QUEUE * busy:
        return "per_expert"
    allowed = BATCHED_MAX_SKEW * pairs / busy + BATCHED_PADDING_MACS / (dim * hidden)
    return "batched" if max(plan.counts) <= allowed else "per_expert"


def _queue_position(expert: Tensor, counts: Tensor) -> Tensor:
    """Position of each queued pair within its expert's queue (queues contiguous, in expert order)."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(expert.numel(), device=expert.device) - starts.index_select(0, expert)


def expert_queues(counts: tuple[int, ...]):
    """Yield ``(expert, start, end)`` for every non-empty queue of a plan's ``counts``, in expert order."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
            start += count


class ExpertMLP(torch.autograd.Function):
    """``out[s] = sum over queued pairs (s, e) of w * (GELU(x[s] W1[e] + b1[e]) W2[e] + b2[e])``."""

    @staticmethod
    def forward(ctx, x, token, gate, counts, w1, b1, w2, b2, keep_hidden):  # noqa: D401 - autograd signature
        out = torch.zeros_like(x)
        # Pre-activations are kept for backward only when a gradient will be asked for.
        hidden_pre = x.new_empty(token.numel(), w1.shape[-1]) if keep_hidden else None
        gate_col = gate.unsqueeze(1)
        for e, lo, hi in expert_queues(counts):
            tok = token[lo:hi]
            xe = x.index_select(0, tok)
            if hidden_pre is not None:
                h = torch.nn.functional.gelu(torch.addmm(b1[e], xe, w1[e], out=hidden_pre[lo:hi]))
            else:
                h = torch.ops.aten.gelu_(torch.addmm(b1[e], xe, w1[e]))
            y = torch.addmm(b2[e], h, w2[e])
            y.mul_(gate_col[lo:hi])
            out.index_add_(0, tok, y)
        ctx.counts = counts
        ctx.save_for_backward(x, token, gate, w1, b1, w2, b2, hidden_pre)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, token, gate, w1, b1, w2, b2, hidden_pre = ctx.saved_tensors
        need_x, _, need_gate, _, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grads = _expert_mlp_backward(grad_out, x, token, gate, ctx.counts, w1, b1, w2, b2, hidden_pre,
                                     (need_x, need_gate, need_w1, need_b1, need_w2, need_b2))
        grad_x, grad_gate, grad_w1, grad_b1, grad_w2, grad_b2 = grads
        return grad_x, None, grad_gate, None, grad_w1, grad_b1, grad_w2, grad_b2, None


def _expert_mlp_backward(grad_out, x, token, gate, counts, w1, b1, w2, b2, hidden_pre, needed):
    """Gradients of ``ExpertMLP`` queue by queue: ``(x, gate, w1, b1, w2, b2)``, None where not ``needed``."""
    need_x, need_gate, need_w1, need_b1, need_w2, need_b2 = needed
    grad_out = grad_out.contiguous()
    grad_x = torch.zeros_like(x) if need_x else None
    grad_gate = torch.zeros_like(gate) if need_gate else None
    grad_w1 = torch.zeros_like(w1) if need_w1 else None
    grad_b1 = torch.zeros_like(b1) if need_b1 else None
    grad_w2 = torch.zeros_like(w2) if need_w2 else None
    grad_b2 = torch.zeros_like(b2) if need_b2 else None
    for e, lo, hi in expert_queues(counts):
        tok = token[lo:hi]
        g = grad_out.index_select(0, tok)                # d out / d y, before gating
        h_pre = hidden_pre[lo:hi]
        act = torch.nn.functional.gelu(h_pre)
        g_hidden = g @ w2[e].t()                          # unscaled: reused for the gate grad
        if need_gate:
            grad_gate[lo:hi] = (g_hidden * act).sum(1) + g @ b2[e]
        g_scaled = g.mul_(gate[lo:hi].unsqueeze(1))     # d loss / d y
        if need_w2:
            torch.addmm(grad_w2[e], act.t(), g_scaled, out=grad_w2[e])
        if need_b2:
            grad_b2[e] += g_scaled.sum(0)
        g_hidden.mul_(gate[lo:hi].unsqueeze(1))
        g_pre = torch.ops.aten.gelu_backward(g_hidden, h_pre)
        if need_b1:
            grad_b1[e] += g_pre.sum(0)
        if need_w1:
            xe = x.index_select(0, tok)
            torch.addmm(grad_w1[e], xe.t(), g_pre, out=grad_w1[e])
        if need_x:
            grad_x.index_add_(0, tok, g_pre @ w1[e].t())
    return grad_x, grad_gate, grad_w1, grad_b1, grad_w2, grad_b2


def _run_batched(x: Tensor, plan: DispatchPlan, gate: Tensor, w1, b1, w2, b2) -> Tensor:
    """All non-empty queues padded to the longest and run as one batched GEMM pair (autograd ops).

    The padded layout is worked out on the host from the plan's ``counts`` (no device sync, few ops): the
    i-th queued pair goes to row ``i + offset[its expert]``, where an expert's offset is its padded start
    (``busy index * longest``) minus its packed start. Without grad mode GELU and the gating run in place.
    """
    busy = [(expert, count) for expert, count in enumerate(plan.counts) if count]
    longest = max(count for _, count in busy)
    offsets, packed_start = [0] * len(plan.counts), 0
    for padded_index, (expert, count) in enumerate(busy):
        offsets[expert] = padded_index * longest - packed_start
        packed_start += count
    device = x.device
    row = torch.arange(plan.token.numel(), device=device).add_(
        torch.tensor(offsets, device=device).index_select(0, plan.expert))
    if len(busy) < len(plan.counts):  # never read an idle expert: keep only the experts with tokens
        used = torch.tensor([expert for expert, _ in busy], device=device)
        w1, b1, w2, b2 = (t.index_select(0, used) for t in (w1, b1, w2, b2))
    experts = len(busy)
    # Padding rows read token 0 and get combine weight 0, so they add nothing (and no gradient).
    padded_token = torch.zeros(experts * longest, dtype=torch.long, device=device).index_put_((row,), plan.token)
    padded_gate = gate.new_zeros(experts * longest).index_put_((row,), gate)
    xs = x.index_select(0, padded_token).view(experts, longest, -1)
    in_place = not torch.is_grad_enabled()  # the same values; autograd would need the inputs kept
    h = torch.baddbmm(b1.unsqueeze(1), xs, w1)
    h = torch.ops.aten.gelu_(h) if in_place else torch.nn.functional.gelu(h)
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(experts * longest, -1)
    y = y.mul_(padded_gate.unsqueeze(1)) if in_place else y * padded_gate.unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, padded_token, y)


def queued_gates(weights: Tensor, plan: DispatchPlan) -> Tensor:
    """The combine weight of every queued pair, in queue order: ``[len(plan.token)]``."""
    # take() reads the transposed view by its logical (choice-major) flat index: no copy of weights.t().
    return weights.t().take(plan.slot)


def dispatch_to_experts(
    x: Tensor,
    indices: Tensor,
    weights: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    capacity: int | None = None,
    strategy: str = "auto",
) -> tuple[Tensor, DispatchPlan]:
    """Run the routed tokens through their experts, queue by queue.

    ``x [S, D]`` tokens, ``indices``/``weights [S, k]`` their expert choices and combine weights,
    expert weights stacked as ``w1 [E, D, H]``, ``b1 [E, H]``, ``w2 [E, H, D]``, ``b2 [E, D]``.
    ``strategy``: ``"per_expert"``, ``"batched"`` or ``"auto"`` (by mean queue length; see the
    module docstring). Returns the combined output ``[S, D]`` and the dispatch plan.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not a dispatch strategy; choose one of {list(STRATEGIES)}")
    plan = plan_dispatch(indices, w1.shape[0], capacity)
    return run_experts(x, plan, weights, w1, b1, w2, b2, strategy), plan


def run_experts(x: Tensor, plan: DispatchPlan, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                strategy: str = "auto") -> Tensor:
    """The resident expert backend: run the queues of ``plan`` over ``x [S, D]`` with the stacked experts,
    combining with ``weights [S, k]``; returns ``[S, D]`` (see ``dispatch_to_experts``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not a dispatch strategy; choose one of {list(STRATEGIES)}")
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        # Run the experts in the autocast dtype, as autocast would run each GEMM, then leave autocast
        # off inside: every buffer stays in one dtype.
        dtype = torch.get_autocast_dtype(device)
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    gate = queued_gates(weights, plan)
    gate = gate if gate.dtype == x.dtype else gate.to(x.dtype)
    if plan.token.numel() == 0:
        return torch.zeros_like(x)
    if strategy == "auto":
        strategy = choose_strategy(plan, w1.shape[1], w1.shape[2])
    # Entering an autocast context costs microseconds: only when there is autocast to leave.
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        if strategy == "batched":
            return _run_batched(x.contiguous(), plan, gate, w1, b1, w2, b2)
        # needs_input_grad inside the op is True under no_grad too; decide here if backward can run.
        keep_hidden = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, w1, b1, w2, b2))
        return ExpertMLP.apply(x.contiguous(), plan.token, gate, plan.counts, w1, b1, w2, b2, keep_hidden)


# ----------------------------------------------------------------------------------------------
# The dispatch as one opaque op, for torch.compile
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("m3vit::moe_experts", mutates_args=())
def moe_experts_op(x: Tensor, indices: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                   capacity: int | None, strategy: str) -> tuple[Tensor, Tensor, Tensor]:
    """``dispatch_to_experts`` as a registered op (``torch.ops.m3vit.moe_experts``), differentiable
    (``moe_experts_backward_op``).

    Its queue lengths depend on the data, so ``torch.compile`` cannot trace the dispatch; as an op with a
    fake (shape-only) implementation the compiled graph runs around it without a break. Returns the
    combined output ``[S, D]`` (``x``'s dtype: cast the inputs first under autocast), the per-expert queue
    lengths ``LongTensor[E]`` and the number of dropped pairs (0-dim), both on ``x``'s device.
    """
    out, plan = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, capacity, strategy)
    counts = torch.tensor(plan.counts, dtype=torch.long, device=x.device)
    return out, counts, torch.tensor(plan.dropped, dtype=torch.long, device=x.device)


@moe_experts_op.register_fake
def _moe_experts_shapes(x, indices, weights, w1, b1, w2, b2, capacity, strategy):
    return torch.empty_like(x), x.new_empty(w1.shape[0], dtype=torch.long), x.new_empty((), dtype=torch.long)


@torch.library.custom_op("m3vit::moe_experts_backward", mutates_args=())
def moe_experts_backward_op(grad_out: Tensor, x: Tensor, indices: Tensor, weights: Tensor, w1: Tensor, b1: Tensor,
                            w2: Tensor, b2: Tensor, capacity: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                   Tensor, Tensor]:
    """Backward of ``moe_experts_op``: gradients for ``x, weights, w1, b1, w2, b2``, expert by expert (the
    per-expert dispatch's hand-written backward, whatever strategy ran forward; the hidden pre-activations
    are recomputed, one extra first GEMM per queue)."""
    plan = plan_dispatch(indices, w1.shape[0], capacity)
    x = x.contiguous()
    gate = queued_gates(weights, plan).to(x.dtype)
    hidden_pre = x.new_empty(plan.token.numel(), w1.shape[-1])
    for e, lo, hi in expert_queues(plan.counts):
        torch.addmm(b1[e], x.index_select(0, plan.token[lo:hi]), w1[e], out=hidden_pre[lo:hi])
    grad_x, grad_gate, grad_w1, grad_b1, grad_w2, grad_b2 = _expert_mlp_backward(
        grad_out, x, plan.token, gate, plan.counts, w1, b1, w2, b2, hidden_pre, (True,) * 6)
    top_k, rows = indices.shape[1], indices.shape[0]
    grad_weights = weights.new_zeros(top_k * rows).index_put_((plan.slot,), grad_gate.to(weights.dtype))
    return grad_x, grad_weights.view(top_k, rows).t().contiguous(), grad_w1, grad_b1, grad_w2, grad_b2


@moe_experts_backward_op.register_fake
def _moe_experts_backward_shapes(grad_out, x, indices, weights, w1, b1, w2, b2, capacity):
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _save_for_backward(ctx, inputs, output) -> None:
    x, indices, weights, w1, b1, w2, b2, capacity, _strategy = inputs
    ctx.save_for_backward(x, indices, weights, w1, b1, w2, b2)
    ctx.capacity = capacity


def _moe_experts_grad(ctx, grad_out, _grad_counts, _grad_dropped):
    x, indices, weights, w1, b1, w2, b2 = ctx.saved_tensors
    grads = moe_experts_backward_op(grad_out, x, indices, weights, w1, b1, w2, b2, ctx.capacity)
    grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2 = grads
    return grad_x, None, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2, None, None


moe_experts_op.register_autograd(_moe_experts_grad, setup_context=_save_for_backward)
