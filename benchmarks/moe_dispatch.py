"""MoE dispatch on CPU: m3vit's expert-by-expert dispatch against its ceiling and its peers.

What it measures
----------------
One sparse MoE MLP layer (16 experts, top-4, every expert ``Linear(D, H) -> exact GELU ->
Linear(H, D)`` with ``H = D``), given a fixed random routing: softmax over random logits, top-4,
combine weights = the picked probabilities (not renormalised). Every implementation gets the same
tokens, routing and stacked expert weights (``w1 [E, D, H]``, ``b1 [E, H]``, ``w2 [E, H, D]``,
``b2 [E, D]``) and computes ``out[s] = sum_j weights[s, j] * expert_{indices[s, j]}(x[s])``:

* ``ours``             ``m3vit.nn.dispatch.dispatch_to_experts`` (sorted per-expert queues, hand-written
                       backward that also runs expert by expert);
* ``dense (ceiling)``  a dense ``Linear(D, 4H) -> GELU -> Linear(4H, D)``: exactly the active FLOPs of
                       the MoE layer with no routing at all; ratios are relative to it;
* ``mask loop``        per expert, a boolean mask of the tokens that chose it, compute, accumulate;
* ``all experts``      every expert over every token, then combine with the dense ``[S, E]`` gate matrix;
* ``gshard einsum``    one-hot ``[S, E, C]`` dispatch/combine tensors and einsums with capacity
                       ``C = ceil(1.25 * S * k / E)`` (one group = the whole batch); drops overflow pairs,
                       so it is checked against ``ours`` run with the same capacity;
* ``grouped_mm``       tokens sorted by expert and two ``torch.nn.functional.grouped_mm`` calls;
* ``lucidrains``       the ``mixture-of-experts`` PyPI package (its own top-2 router, per-sequence
                       capacity, no expert biases) -- a different layer, timed for reference only.

Each implementation is timed forward (under ``torch.no_grad()``) and forward+backward (gradients
for the tokens, the expert weights and the combine weights), at a ViT-S shape (8 x 1025 tokens,
D = 384) and a small shape (2 x 197 tokens, D = 192). Repeats are interleaved round-robin over the
implementations (after a warm-up, rotating the starting implementation each round) in one process,
and medians are reported. A last section times a task-batched M3ViT-tiny training step (all five
tasks in one backbone pass) against a Python loop over the tasks.

Targets: ``ours`` within 1.05x of the equal-FLOPs dense MLP (forward) and faster than every peer.

``--crossover`` instead sweeps expert width and mean queue length, timing the two dispatch strategies
(``per_expert``, ``batched``) forward, and shows where ``dispatch="auto"`` picks the slower one.

Run: ``.venv/bin/python benchmarks/moe_dispatch.py [--quick] [--repeats N] [--out PATH]``, or
``.venv/bin/python benchmarks/moe_dispatch.py --crossover [--crossover-widths 192 384 768]
[--crossover-queues 16 32 64 128 256] [--crossover-experts 16] [--crossover-skews 0 1] [--repeats 5] [--device cpu|cuda] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from _env import loadavg, machine_info as _machine_info
import torch.nn.functional as F
from torch import Tensor, nn

import m3vit
from m3vit.nn.dispatch import choose_strategy, dispatch_to_experts, plan_dispatch
from m3vit.utils.io import write_json

try:  # optional peer: `pip install mixture-of-experts` (the `bench` extra)
    from mixture_of_experts import MoE as LucidrainsMoE
    LUCIDRAINS_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    LucidrainsMoE = None
    LUCIDRAINS_ERROR = f"{type(exc).__name__}: {exc}"

CAPACITY_FACTOR = 1.25
DENSE = "dense (ceiling)"
TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]


# ---------------------------------------------------------------------------------------------
# Problem set-up
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int      # tokens per image (sequence length)
    dim: int
    experts: int
    top_k: int
    hidden: int      # hidden units of one expert

    @property
    def num_tokens(self) -> int:
        return self.batch * self.tokens


VIT_S = Shape("ViT-S 8x1025, D=384, E=16, k=4, H=384", 8, 1025, 384, 16, 4, 384)
SMALL = Shape("small 2x197, D=192, E=16, k=4, H=192", 2, 197, 192, 16, 4, 192)


def gshard_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float = CAPACITY_FACTOR) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def random_routing(num_tokens: int, num_experts: int, top_k: int, generator: torch.Generator,
                   skew: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax of random logits, top-k; combine weights are the picked probabilities. ``skew`` adds a
    per-expert bias from ``+skew`` to ``-skew`` to the logits: some experts get long queues, others short
    ones, as a trained router's uneven choices do (0: nearly even queues)."""
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if skew:
        logits += torch.linspace(skew, -skew, num_experts)
    weights, indices = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return weights.contiguous(), indices.contiguous()


def make_problem(shape: Shape, seed: int = 0, skew: float = 0.0) -> dict[str, Tensor]:
    """Tokens, routing (``random_routing``, ``skew``) and stacked expert weights at O(1) activation scale."""
    g = torch.Generator().manual_seed(seed)
    s, d, e, h = shape.num_tokens, shape.dim, shape.experts, shape.hidden
    weights, indices = random_routing(s, e, shape.top_k, g, skew)
    return {
        "x": torch.randn(s, d, generator=g),
        "indices": indices,
        "weights": weights,
        "w1": torch.randn(e, d, h, generator=g) / math.sqrt(d),
        "b1": torch.randn(e, h, generator=g) * 0.1,
        "w2": torch.randn(e, h, d, generator=g) / math.sqrt(h),
        "b2": torch.randn(e, d, generator=g) * 0.1,
    }


# ---------------------------------------------------------------------------------------------
# Implementations: fn(x, indices, weights, w1, b1, w2, b2) -> out [S, D]
# ---------------------------------------------------------------------------------------------
def moe_ours(x, indices, weights, w1, b1, w2, b2, capacity=None):
    """m3vit's reordered dispatch (strategy "auto": per-expert queues, or batched when queues are short)."""
    return dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, capacity)[0]


def moe_mask_loop(x, indices, weights, w1, b1, w2, b2):
    """Per expert: boolean mask of the tokens that picked it, run it on them, add the weighted result."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        picked = indices == e                          # [S, k]
        mask = picked.any(dim=1)                       # [S]
        if not bool(mask.any()):
            continue
        gate = (weights * picked).sum(dim=1)[mask]     # this expert's combine weight per token
        h = F.gelu(x[mask] @ w1[e] + b1[e])
        out[mask] += gate.unsqueeze(1) * (h @ w2[e] + b2[e])
    return out


def moe_all_experts(x, indices, weights, w1, b1, w2, b2):
    """Every expert on every token, then a combine with the sparse gate matrix (zeros off the top-k)."""
    num_experts = w1.shape[0]
    xs = x.unsqueeze(0).expand(num_experts, -1, -1)                    # [E, S, D]
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), xs, w1))                 # [E, S, H]
    y = torch.baddbmm(b2.unsqueeze(1), h, w2)                          # [E, S, D]
    gates = weights.new_zeros(x.shape[0], num_experts).scatter(1, indices, weights)
    return torch.einsum("se,esd->sd", gates, y)


def gshard_tensors(indices, weights, num_experts: int, capacity: int):
    """One-hot ``dispatch`` and ``combine`` tensors ``[S, E, C]``.

    A pair's slot in its expert's buffer is its rank among the pairs routed there, counting all first
    choices before any second choice (choice-major, then token order); pairs ranked ``>= capacity``
    are dropped (their rows in both tensors are zero).
    """
    num_tokens, top_k = indices.shape
    flat = indices.t().reshape(-1)                                     # [k*S], choice-major
    one_hot = F.one_hot(flat, num_experts)
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(1)              # rank within the expert
    position = position.view(top_k, num_tokens).t()                   # [S, k]
    keep = (position < capacity).to(weights.dtype)
    expert_hot = F.one_hot(indices, num_experts).to(weights.dtype) * keep.unsqueeze(-1)   # [S, k, E]
    slot_hot = F.one_hot(position.clamp(max=capacity - 1), capacity).to(weights.dtype)   # [S, k, C]
    dispatch = torch.einsum("ske,skc->sec", expert_hot, slot_hot)
    combine = torch.einsum("sk,ske,skc->sec", weights, expert_hot, slot_hot)
    dropped = int(keep.numel() - keep.sum())
    return dispatch, combine, dropped


def moe_gshard(x, indices, weights, w1, b1, w2, b2, capacity_factor: float = CAPACITY_FACTOR):
    """GShard-style dispatch: einsum tokens into ``[E, C, D]`` expert buffers and back out."""
    num_experts = w1.shape[0]
    capacity = gshard_capacity(x.shape[0], indices.shape[1], num_experts, capacity_factor)
    dispatch, combine, _ = gshard_tensors(indices, weights, num_experts, capacity)
    expert_in = torch.einsum("sec,sd->ecd", dispatch, x)               # [E, C, D]
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), expert_in, w1))
    y = torch.baddbmm(b2.unsqueeze(1), h, w2)                          # [E, C, D]
    return torch.einsum("sec,ecd->sd", combine, y)


def moe_grouped_mm(x, indices, weights, w1, b1, w2, b2):
    """Sort the (token, choice) pairs by expert, two ``F.grouped_mm`` GEMMs, un-permute and combine."""
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)                                         # token-major [S*k]
    order = torch.argsort(flat, stable=True)
    expert_of_row = flat.index_select(0, order)
    token_of_row = order.div(top_k, rounding_mode="floor")
    offs = torch.cumsum(torch.bincount(flat, minlength=w1.shape[0]), 0).to(torch.int32)
    xs = x.index_select(0, token_of_row)
    h = F.grouped_mm(xs, w1, offs=offs) + b1.index_select(0, expert_of_row)
    y = F.grouped_mm(F.gelu(h), w2, offs=offs) + b2.index_select(0, expert_of_row)
    y = y * weights.reshape(-1).index_select(0, order).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, token_of_row, y)


def make_dense(shape: Shape, seed: int = 1) -> nn.Module:
    """The ceiling: one dense MLP with hidden ``k*H`` (the MoE layer's active FLOPs per token)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(shape.dim, shape.top_k * shape.hidden), nn.GELU(), nn.Linear(shape.top_k * shape.hidden, shape.dim)
    )


def lucidrains_capacity_factor(top_k: int = 2) -> float:
    """Its per-sequence capacity is ``N * cf / E`` (no ``k`` in it): give every choice 1.25x slack."""
    return CAPACITY_FACTOR * top_k


def make_lucidrains(shape: Shape, hidden: int, seed: int = 2) -> nn.Module | None:
    """The package's MoE set as close to ours as it allows: exact GELU, always use the 2nd expert."""
    if LucidrainsMoE is None:
        return None
    torch.manual_seed(seed)
    cf = lucidrains_capacity_factor()
    module = LucidrainsMoE(
        dim=shape.dim, num_experts=shape.experts, hidden_dim=hidden, activation=nn.GELU,
        second_policy_train="all", second_policy_eval="all",
        capacity_factor_train=cf, capacity_factor_eval=cf,
    )
    return module.eval()


def lucidrains_capacity(shape: Shape) -> int:
    # mirrors mixture_of_experts.Top2Gating: min(N, int(N * cf / E)), at least 4
    return max(4, min(shape.tokens, int(shape.tokens * lucidrains_capacity_factor() / shape.experts)))


# ---------------------------------------------------------------------------------------------
# FLOP accounting (matrix products only, 2 FLOPs per multiply-add, forward)
# ---------------------------------------------------------------------------------------------
def forward_gflop(name: str, shape: Shape, lucidrains_hidden: int | None = None) -> float:
    s, d, e, k, h = shape.num_tokens, shape.dim, shape.experts, shape.top_k, shape.hidden
    active = 4.0 * s * k * d * h
    if name == "all experts":
        flops = 4.0 * s * e * d * h
    elif name == "gshard einsum":
        c = gshard_capacity(s, k, e)
        flops = 4.0 * e * c * d * h + 2 * (2.0 * s * e * c * d) + 2 * (2.0 * s * k * e * c)
    elif name.startswith("lucidrains"):
        c = lucidrains_capacity(shape)
        flops = 4.0 * e * shape.batch * c * d * lucidrains_hidden + 2 * (2.0 * s * e * c * d) + 2.0 * s * d * e
    else:
        flops = active
    return flops / 1e9


# ---------------------------------------------------------------------------------------------
# Timing harness
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    max_repeats: int | None = None   # heavy cases take part in the first rounds only
    inner: int = 1                   # calls per sample (calibrated so a sample lasts >= min_sample_s)
    samples: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return 1e3 * statistics.median(self.samples) if self.samples else None


def time_interleaved(cases: list[Case], repeats: int, warmup: int, min_sample_s: float = 0.05) -> None:
    """Warm every case up, then ``repeats`` rounds, each timing every case once, in rotated order.

    A case whose one call is shorter than ``min_sample_s`` is called ``inner`` times per sample.
    Heavy cases (``max_repeats`` set) skip the warm-up and take part in the first rounds only.
    """
    for case in cases:
        if case.max_repeats is not None:
            continue                    # heavy: no warm-up, one call per sample
        elapsed = 0.0
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            case.fn()
            elapsed = time.perf_counter() - t0
        case.inner = max(1, math.ceil(min_sample_s / max(elapsed, 1e-9)))
    gc.collect()
    for r in range(repeats):
        rot = r % len(cases)
        for case in cases[rot:] + cases[:rot]:
            if case.max_repeats is not None and r >= case.max_repeats:
                continue
            t0 = time.perf_counter()
            for _ in range(case.inner):
                case.fn()
            case.samples.append((time.perf_counter() - t0) / case.inner)


def forward_case(name: str, fn: Callable[[], Tensor], max_repeats=None) -> Case:
    def run():
        with torch.no_grad():
            fn()
    return Case(name, run, max_repeats)


def train_case(name: str, fn: Callable[[], Tensor], leaves: list[Tensor], grad_out: Tensor, max_repeats=None) -> Case:
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(grad_out)
    return Case(name, run, max_repeats)


# ---------------------------------------------------------------------------------------------
# One shape: correctness check, then forward and forward+backward timing
# ---------------------------------------------------------------------------------------------
EXACT = {
    "ours": moe_ours,
    "mask loop": moe_mask_loop,
    "all experts": moe_all_experts,
    "grouped_mm": moe_grouped_mm,
}


def _grads(fn, p: dict[str, Tensor], grad_out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items() if n != "indices"}
    out = fn(leaves["x"], p["indices"], leaves["weights"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"])
    out.backward(grad_out)
    return out.detach(), {n: t.grad for n, t in leaves.items()}


def check_correctness(shape: Shape, p: dict[str, Tensor], grad_out: Tensor) -> dict:
    """Max |difference| to ``ours`` of the output (forward) and of every gradient (relative to max |grad|)."""
    report = {}
    ref_out, ref_grads = _grads(moe_ours, p, grad_out)
    for name, fn in EXACT.items():
        if name == "ours":
            continue
        out, grads = _grads(fn, p, grad_out)
        rel = {n: float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()) for n, g in grads.items()}
        report[name] = {"out_max_abs_diff": float((out - ref_out).abs().max()), "grad_max_rel_diff": max(rel.values()),
                        "ok": bool(torch.allclose(out, ref_out, atol=1e-4, rtol=1e-4) and max(rel.values()) < 1e-4)}
    # GShard drops overflow pairs: compare it with ours run at the same capacity (same drop rule).
    capacity = gshard_capacity(shape.num_tokens, shape.top_k, shape.experts)
    with torch.no_grad():
        ours_cap, plan = dispatch_to_experts(p["x"], p["indices"], p["weights"], p["w1"], p["b1"], p["w2"], p["b2"], capacity)
        gs = moe_gshard(p["x"], p["indices"], p["weights"], p["w1"], p["b1"], p["w2"], p["b2"])
    report["gshard einsum"] = {
        "capacity": capacity, "dropped_pairs": plan.dropped, "pairs": shape.num_tokens * shape.top_k,
        "out_max_abs_diff_vs_dropless": float((gs - ref_out).abs().max()),
        "out_max_abs_diff_vs_ours_same_capacity": float((gs - ours_cap).abs().max()),
        "ok": bool(torch.allclose(gs, ours_cap, atol=1e-4, rtol=1e-4)),
    }
    for name, r in report.items():
        if "grad_max_rel_diff" in r:
            print(f"  check {name:<14} out max|diff| {r['out_max_abs_diff']:.2e}   "
                  f"grads max rel diff {r['grad_max_rel_diff']:.2e}   {'OK' if r['ok'] else 'MISMATCH'}")
        else:
            print(f"  check {name:<14} vs ours(capacity={r['capacity']}) max|diff| "
                  f"{r['out_max_abs_diff_vs_ours_same_capacity']:.2e} {'OK' if r['ok'] else 'MISMATCH'}; "
                  f"drops {r['dropped_pairs']}/{r['pairs']} pairs (vs dropless: {r['out_max_abs_diff_vs_dropless']:.2e})")
    return report


def bench_shape(shape: Shape, repeats: int, warmup: int, heavy_repeats: int, only: list[str] | None = None) -> dict:
    print(f"\n## {shape.name}  (S = {shape.num_tokens})")
    p = make_problem(shape)
    strategy = choose_strategy(plan_dispatch(p["indices"], shape.experts), shape.dim, shape.hidden)
    print(f"  ours: mean queue {shape.num_tokens * shape.top_k / shape.experts:.0f} rows -> strategy '{strategy}'")
    g = torch.Generator().manual_seed(123)
    grad_out = torch.randn(shape.num_tokens, shape.dim, generator=g)
    checks = check_correctness(shape, p, grad_out)

    # GShard's [S, E, C] tensors grow with S^2: at large S give it fewer rounds.
    gshard_elems = shape.num_tokens * shape.experts * gshard_capacity(shape.num_tokens, shape.top_k, shape.experts)
    gshard_heavy = heavy_repeats if gshard_elems > 50_000_000 else None

    names = ["ours", DENSE, "mask loop", "all experts", "gshard einsum", "grouped_mm"]
    impls = {**EXACT, "gshard einsum": moe_gshard}
    dense = make_dense(shape)
    lucid = {}
    for hidden in (shape.hidden, 2 * shape.hidden):
        module = make_lucidrains(shape, hidden)
        if module is not None:
            lucid[f"lucidrains H={hidden}"] = (module, hidden)
    names += list(lucid)
    if only:  # a head-to-head subset; the dense ceiling is always timed (ratios are to it)
        names = [n for n in names if n == DENSE or any(n == o or n.startswith(o + " ") for o in only)]

    # forward, no grad
    args = tuple(p[n] for n in ("x", "indices", "weights", "w1", "b1", "w2", "b2"))
    x3 = p["x"].view(shape.batch, shape.tokens, shape.dim)
    fwd = []
    for name in names:
        heavy = gshard_heavy if name == "gshard einsum" else None
        if name == DENSE:
            fwd.append(forward_case(name, lambda: dense(p["x"])))
        elif name in lucid:
            fwd.append(forward_case(name, lambda m=lucid[name][0]: m(x3)[0]))
        else:
            fwd.append(forward_case(name, lambda f=impls[name]: f(*args), heavy))
    print(f"  timing forward: {repeats} interleaved rounds ...", flush=True)
    time_interleaved(fwd, repeats, warmup)

    # forward + backward
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items() if n != "indices"}
    targs = tuple(leaves[n] if n in leaves else p[n] for n in ("x", "indices", "weights", "w1", "b1", "w2", "b2"))
    tleaves = [t for t in targs if t.requires_grad]
    xg = leaves["x"]
    train = []
    for name in names:
        heavy = gshard_heavy if name == "gshard einsum" else None
        if name == DENSE:
            train.append(train_case(name, lambda: dense(xg), [xg, *dense.parameters()], grad_out))
        elif name in lucid:
            m = lucid[name][0]
            train.append(train_case(name, lambda m=m: m(xg.view(shape.batch, shape.tokens, shape.dim))[0],
                                    [xg, *m.parameters()], grad_out.view(shape.batch, shape.tokens, shape.dim)))
        else:
            train.append(train_case(name, lambda f=impls[name]: f(*targs), tleaves, grad_out, heavy))
    print(f"  timing forward+backward: {repeats} interleaved rounds ...", flush=True)
    time_interleaved(train, repeats, warmup)

    fwd_by, train_by = {c.name: c for c in fwd}, {c.name: c for c in train}
    dense_f, dense_t = fwd_by[DENSE].median_ms, train_by[DENSE].median_ms
    rows = []
    for name in names:
        f, t = fwd_by[name], train_by[name]
        rows.append({
            "implementation": name,
            "fwd_median_ms": f.median_ms, "fwd_ratio_to_dense": f.median_ms / dense_f,
            "fwdbwd_median_ms": t.median_ms, "fwdbwd_ratio_to_dense": t.median_ms / dense_t,
            "fwd_gflop": forward_gflop(name, shape, lucid.get(name, (None, None))[1]),
            "fwd_samples_ms": [1e3 * s for s in f.samples], "fwdbwd_samples_ms": [1e3 * s for s in t.samples],
            "calls_per_sample": {"fwd": f.inner, "fwdbwd": t.inner},
            "rounds": {"fwd": len(f.samples), "fwdbwd": len(t.samples)},
        })
    print_table(rows, repeats)
    return {
        "shape": asdict(shape), "num_tokens": shape.num_tokens, "ours_strategy": strategy,
        "gshard_capacity": gshard_capacity(shape.num_tokens, shape.top_k, shape.experts),
        "gshard_dispatch_tensor_mb": 4 * gshard_elems / 2**20,
        "gshard_rounds": gshard_heavy or repeats,
        "lucidrains_capacity_per_sequence": lucidrains_capacity(shape) if lucid else None,
        "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "correctness": checks, "rows": rows,
    }


def print_table(rows: list[dict], repeats: int) -> None:
    print("\n| implementation | fwd median ms | fwd / dense | fwd+bwd median ms | fwd+bwd / dense | fwd GFLOP |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r["rounds"]["fwd"]
        label = r["implementation"] + (f" ({n} round{'s' * (n > 1)})" if n < repeats else "")
        print(f"| {label} | {r['fwd_median_ms']:.2f} | {r['fwd_ratio_to_dense']:.2f}x | "
              f"{r['fwdbwd_median_ms']:.2f} | {r['fwdbwd_ratio_to_dense']:.2f}x | {r['fwd_gflop']:.2f} |")
    print()


# ---------------------------------------------------------------------------------------------
# Task-batched vs sequential training step of a whole model
# ---------------------------------------------------------------------------------------------
def bench_task_batched(repeats: int, batch: int = 2, img: int = 128) -> dict:
    """One training step (fwd+bwd) of all five tasks: one task-batched pass vs a loop over the tasks.

    Also the same pair for the backbone alone (loss on its output tokens), since at 128x128 the five
    SETR-PUP heads (identical work in both modes) hold most of the FLOPs.
    """
    print(f"\n## task-batched vs sequential: m3vit_tiny, {len(TASKS)} tasks, batch {batch} at {img}x{img}, "
          "train mode, fwd+bwd")
    torch.manual_seed(0)
    model = m3vit.create_model("m3vit_tiny", TASKS, img_size=(img, img)).train()
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(7))
    task_ids = list(range(len(TASKS)))

    def batched():
        model.zero_grad(set_to_none=True)
        outs = model(images)
        loss = sum(o.mean() for o in outs.values()) + model.aux_loss()
        loss.backward()

    def sequential():
        model.zero_grad(set_to_none=True)
        for task in TASKS:
            out = model(images, tasks=[task])[task]
            (out.mean() + model.aux_loss()).backward()

    def backbone_batched():
        model.zero_grad(set_to_none=True)
        feats, _ = model.backbone(images, task_ids)
        (feats.mean(dim=(1, 2, 3)).sum() + model.aux_loss()).backward()

    def backbone_sequential():
        model.zero_grad(set_to_none=True)
        for i in task_ids:
            feats, _ = model.backbone(images, [i])
            (feats.mean() + model.aux_loss()).backward()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def compare(one, other):
        one()
        g_one = grads()
        other()
        g_other = grads()
        diff = max(float((g_one[n] - g_other[n]).abs().max() / (g_other[n].abs().max() + 1e-12))
                   for n in g_other if n in g_one)
        return {"same_parameters": set(g_one) == set(g_other), "max_rel_grad_diff": diff}

    checks = {"full": compare(batched, sequential), "backbone": compare(backbone_batched, backbone_sequential)}
    for name, c in checks.items():
        print(f"  check {name}: same parameters get grads: {c['same_parameters']}; "
              f"max rel grad diff {c['max_rel_grad_diff']:.2e}")

    # The gradient checks above ran every case once: that is the warm-up.
    cases = [Case("task-batched (one pass)", batched, max_repeats=repeats),
             Case("sequential (loop over tasks)", sequential, max_repeats=repeats),
             Case("backbone only, task-batched", backbone_batched, max_repeats=repeats),
             Case("backbone only, sequential", backbone_sequential, max_repeats=repeats)]
    print(f"  timing: {repeats} interleaved rounds ...", flush=True)
    time_interleaved(cases, repeats, warmup=0)
    med = [c.median_ms for c in cases]
    print("\n| mode | fwd+bwd median ms | ratio to task-batched |\n|---|---:|---:|")
    for c, ref in zip(cases, (med[0], med[0], med[2], med[2])):
        print(f"| {c.name} | {c.median_ms:.1f} | {c.median_ms / ref:.2f}x |")
    print()
    return {
        "model": "m3vit_tiny", "tasks": TASKS, "batch": batch, "img_size": [img, img], "rounds": repeats,
        "grad_check": checks,
        "task_batched_median_ms": med[0], "sequential_median_ms": med[1], "sequential_over_batched": med[1] / med[0],
        "backbone_task_batched_median_ms": med[2], "backbone_sequential_median_ms": med[3],
        "backbone_sequential_over_batched": med[3] / med[2],
        "samples_ms": {c.name: [1e3 * t for t in c.samples] for c in cases},
    }


# ---------------------------------------------------------------------------------------------
# Crossover of the two dispatch strategies (what dispatch="auto" should pick)
# ---------------------------------------------------------------------------------------------
CROSSOVER_WIDTHS = (192, 384, 768)
CROSSOVER_QUEUES = (16, 32, 64, 128, 256)


def bench_crossover(widths, queues, experts: int, repeats: int, warmup: int, device: str = "cpu",
                    skews=(0.0,)) -> dict:
    """Forward (no grad) of ``per_expert`` against ``batched`` for expert width ``D = H``, mean queue length
    ``S * k / E`` (top-4) and routing ``skew`` (``random_routing``: 0 gives nearly even queues, longest
    ~1.1-1.3x the mean; a trained router's are more uneven, which costs batched more padding).

    ``choose_strategy`` (what ``dispatch="auto"`` runs) is printed per point, with the padding it weighs:
    the padded rows per busy expert (``longest - mean``) times ``D x H``, in multiply-adds.
    """
    top_k = 4
    print(f"\n## crossover: per_expert vs batched forward, E={experts}, top-{top_k}, D=H in {list(widths)}, "
          f"mean queue in {list(queues)} rows, skew in {list(skews)}")
    print("\n| D=H | skew | mean queue | longest | padding MACs per expert (M) | per_expert ms (median / min) | "
          "batched ms (median / min) | batched / per_expert (medians / mins) | auto picks |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    points = []
    for skew in skews:
        for dim in widths:
            for queue in queues:
                num_tokens = max(1, queue * experts // top_k)
                p = make_problem(Shape("crossover", 1, num_tokens, dim, experts, top_k, dim), seed=dim + queue,
                                 skew=skew)
                args = tuple(p[k].to(device) for k in ("x", "indices", "weights", "w1", "b1", "w2", "b2"))
                plan = plan_dispatch(p["indices"], experts)

                def run(strategy, args=args):
                    dispatch_to_experts(*args, strategy=strategy)
                    if device == "cuda":
                        torch.cuda.synchronize()

                cases = [Case(s, lambda s=s: run(s)) for s in ("per_expert", "batched")]
                with torch.no_grad():
                    time_interleaved(cases, repeats, warmup, min_sample_s=0.02)
                per_expert, batched = (c.median_ms for c in cases)
                per_expert_min, batched_min = (1e3 * min(c.samples) for c in cases)
                busy = sum(1 for c in plan.counts if c)
                mean_queue = num_tokens * top_k / busy
                longest = max(plan.counts)
                padding_macs = (longest - mean_queue) * dim * dim
                pick = choose_strategy(plan, dim, dim)
                points.append({"dim": dim, "hidden": dim, "experts": experts, "top_k": top_k, "skew": skew,
                               "num_tokens": num_tokens, "mean_queue": mean_queue, "longest_queue": longest,
                               "padding_macs_per_expert": padding_macs, "per_expert_ms": per_expert,
                               "batched_ms": batched, "batched_over_per_expert": batched / per_expert,
                               "per_expert_min_ms": per_expert_min, "batched_min_ms": batched_min,
                               "batched_over_per_expert_min": batched_min / per_expert_min, "auto": pick,
                               "samples_ms": {c.name: [1e3 * t for t in c.samples] for c in cases}})
                print(f"| {dim} | {skew:g} | {mean_queue:.0f} | {longest} | {padding_macs / 1e6:.2f} | "
                      f"{per_expert:.2f} / {per_expert_min:.2f} | {batched:.2f} / {batched_min:.2f} | "
                      f"{batched / per_expert:.2f} / {batched_min / per_expert_min:.2f} | {pick} |", flush=True)
    # Judged on the minima: on a shared machine they are the better estimate of the uncontended cost. A point
    # within 5% either way is a tie: either pick is right.
    wrong = [pt for pt in points if abs(pt["batched_over_per_expert_min"] - 1) > 0.05
             and (pt["auto"] == "batched") != (pt["batched_min_ms"] < pt["per_expert_min_ms"])]
    print(f"\n  auto picks the slower strategy (by minima, ties within 5% aside) at {len(wrong)} of {len(points)} points"
          + (": " + ", ".join(f"D={pt['dim']} skew {pt['skew']:g} queue {pt['mean_queue']:.0f} "
                              f"({pt['batched_over_per_expert_min']:.2f}x)" for pt in wrong) if wrong else ""))
    # What auto's picks cost: the time over the faster strategy, in sum over the points and at the worst one.
    chosen = [pt["batched_min_ms"] if pt["auto"] == "batched" else pt["per_expert_min_ms"] for pt in points]
    fastest = [min(pt["batched_min_ms"], pt["per_expert_min_ms"]) for pt in points]
    worst = max(c / f for c, f in zip(chosen, fastest))
    print(f"  auto's picks take {sum(chosen) / sum(fastest):.3f}x the faster strategy's time summed over the points; "
          f"worst point {worst:.2f}x")
    return {"experts": experts, "top_k": top_k, "repeats": repeats, "device": device, "skews": list(skews),
            "points": points, "auto_wrong": len(wrong), "auto_over_fastest_sum": sum(chosen) / sum(fastest),
            "auto_over_fastest_worst": worst}


# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    info = _machine_info()
    info["lucidrains_mixture_of_experts"] = LUCIDRAINS_ERROR or "available"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small shape only, few repeats")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per shape (default 11, quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation before the rounds")
    ap.add_argument("--heavy-repeats", type=int, default=1,
                    help="rounds for GShard where its [S,E,C] tensors exceed 200 MB (ViT-S: ~40-80 s a call)")
    ap.add_argument("--model-repeats", type=int, default=None,
                    help="interleaved rounds of the task-batched section (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N); default: leave torch's default (all cores)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="time only these implementations (plus the dense ceiling), e.g. --only ours grouped_mm")
    ap.add_argument("--skip-model", action="store_true", help="skip the task-batched vs sequential model section")
    ap.add_argument("--crossover", action="store_true",
                    help="only the per_expert vs batched crossover sweep (what dispatch='auto' picks)")
    ap.add_argument("--crossover-widths", type=int, nargs="+", default=list(CROSSOVER_WIDTHS), metavar="D")
    ap.add_argument("--crossover-queues", type=int, nargs="+", default=list(CROSSOVER_QUEUES), metavar="ROWS")
    ap.add_argument("--crossover-experts", type=int, default=16)
    ap.add_argument("--crossover-skews", type=float, nargs="+", default=[0.0, 1.0], metavar="SKEW",
                    help="routing skews of the sweep (0: even queues; 1: longest queue ~2-3x the mean)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="device of the --crossover sweep (the other sections run on CPU)")
    ap.add_argument("--out", default="benchmarks/results/moe_dispatch.json")
    args = ap.parse_args(argv)
    peers = ["ours", "mask loop", "all experts", "gshard einsum", "grouped_mm", "lucidrains"]
    unknown = [o for o in args.only or [] if o not in peers]
    if unknown:
        ap.error(f"--only: unknown implementation(s) {unknown}; choose from {peers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 11)
    model_repeats = args.model_repeats or (1 if args.quick else 3)
    warmup = args.warmup

    info = machine_info()
    print(f"# MoE dispatch benchmark  torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']}")
    if LUCIDRAINS_ERROR:
        print(f"  mixture-of-experts (lucidrains) not available, skipped: {LUCIDRAINS_ERROR}")
    start = time.perf_counter()
    shapes = [SMALL] if args.quick else [VIT_S, SMALL]
    results = {"machine": info, "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
               "args": vars(args), "repeats": repeats, "model_repeats": model_repeats, "warmup": warmup,
               "shapes": []}
    if args.crossover:
        results["loadavg_before"] = loadavg()
        if args.device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: CUDA is not available here")
        results["crossover"] = bench_crossover(args.crossover_widths, args.crossover_queues, args.crossover_experts,
                                               args.repeats or 5, warmup, args.device, args.crossover_skews)
        results["loadavg_after"] = loadavg()
        results["elapsed_s"] = time.perf_counter() - start
        write_json(args.out, results)
        print(f"\nload average before {results['loadavg_before']}, after {results['loadavg_after']}")
        print(f"wrote {args.out} ({results['elapsed_s']:.0f} s)")
        return 0
    for shape in shapes:
        results["shapes"].append(bench_shape(shape, repeats, warmup, args.heavy_repeats, args.only))
    # --quick: a smoke run of the section at batch 1, 64x64
    if not args.skip_model:
        results["task_batched_vs_sequential"] = (
            bench_task_batched(model_repeats, batch=1, img=64) if args.quick else bench_task_batched(model_repeats))
    results["notes"] = NOTES
    results["elapsed_s"] = time.perf_counter() - start
    write_json(args.out, results)
    print("Notes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\nwrote {args.out} ({results['elapsed_s']:.0f} s)")
    return 0


NOTES = [
    "Medians of interleaved rounds in one process; ratios are to the dense MLP with the same active FLOPs "
    "(Linear(D,4H) -> GELU -> Linear(4H,D)), forward to forward and fwd+bwd to fwd+bwd.",
    "Routing (softmax of random logits, top-4, unnormalised weights) is fixed and not timed, except for "
    "lucidrains, which runs its own router inside the call.",
    "fwd+bwd: gradients for the tokens, w1/b1/w2/b2 and the combine weights (dense: tokens and its weights).",
    "gshard einsum drops (token, choice) pairs beyond capacity C = ceil(1.25*S*k/E) (one group = whole batch); "
    "its dispatch and combine einsums cost 2*S*E*C*D FLOPs each, far above the experts' own FLOPs at large S. "
    "At the ViT-S shape its two [S,E,C] tensors take 1.3 GB each (process peak RSS ~5.5 GB, fwd+bwd), one call "
    "takes 10-30 s, so it runs --heavy-repeats rounds (default 1) without warm-up; see gshard_rounds in the JSON.",
    "lucidrains (PyPI mixture-of-experts 0.2.x) is a different layer: top-2 by design (second expert always used, "
    "weights renormalised over the two), its own gating network, per-sequence capacity int(N*2.5/E) so 1.25x slack "
    "per choice, drops overflow, no expert biases. H=D has half our active hidden units per token, H=2D the same "
    "(2 x 2D = 4 x D); it computes every capacity slot, filled or not (5/8 and 5/4 of our expert FLOPs), plus "
    "one-hot dispatch/combine einsums per sequence (see the fwd GFLOP column).",
    "fwd GFLOP counts matrix products only (experts, dispatch/combine einsums, lucidrains' gate), 2 per multiply-add.",
]


if __name__ == "__main__":
    sys.exit(main())
