"""Expert-by-expert dispatch (``plan_dispatch``, ``dispatch_to_experts``) against a float64 per-token loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from m3vit.nn import dispatch_to_experts, expert_capacity, plan_dispatch
from m3vit.nn.dispatch import BATCHED_MAX_MEAN_QUEUE, BATCHED_MAX_SKEW, BATCHED_PADDING_MACS, choose_strategy

STRATEGIES = pytest.mark.parametrize("strategy", ["per_expert", "batched"])

F64 = torch.float64
FAST = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------


def gelu_ref(z: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written out by hand."""
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def kept_pairs_ref(indices: torch.Tensor, num_experts: int, capacity: int | None) -> set[tuple[int, int]]:
    """(token, choice) pairs that survive ``capacity``: per expert, rank pairs by (choice, token)."""
    num_tokens, top_k = indices.shape
    kept = set()
    for e in range(num_experts):
        queue = [(j, s) for j in range(top_k) for s in range(num_tokens) if int(indices[s, j]) == e]
        if capacity is not None:
            queue = queue[:capacity]
        kept.update((s, j) for j, s in queue)
    return kept


def dispatch_ref(x, indices, weights, w1, b1, w2, b2, kept=None):
    """``out[s] = sum_j w[s,j] * (gelu(x[s] @ w1[e] + b1[e]) @ w2[e] + b2[e])``, one token at a time."""
    num_tokens, top_k = indices.shape
    rows = []
    for s in range(num_tokens):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(top_k):
            if kept is not None and (s, j) not in kept:
                continue
            e = int(indices[s, j])
            hidden = gelu_ref(x[s] @ w1[e] + b1[e])
            acc = acc + weights[s, j] * (hidden @ w2[e] + b2[e])
        rows.append(acc)
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Problem generation
# ----------------------------------------------------------------------------------------------


def make_problem(num_tokens, num_experts, top_k, dim, hidden, num_used, seed, requires_grad=False):
    """Random float64 problem whose tokens only choose among ``num_used`` experts (distinct per token)."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.randperm(num_experts, generator=gen)[:num_used]
    indices = torch.stack(
        [used[torch.randperm(num_used, generator=gen)[:top_k]] for _ in range(num_tokens)]
    ).long()
    weights = torch.rand(num_tokens, top_k, generator=gen, dtype=F64) + 0.1
    x = torch.randn(num_tokens, dim, generator=gen, dtype=F64)
    w1 = torch.randn(num_experts, dim, hidden, generator=gen, dtype=F64)
    b1 = torch.randn(num_experts, hidden, generator=gen, dtype=F64)
    w2 = torch.randn(num_experts, hidden, dim, generator=gen, dtype=F64)
    b2 = torch.randn(num_experts, dim, generator=gen, dtype=F64)
    tensors = [x, weights, w1, b1, w2, b2]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return indices, used, tensors


@st.composite
def problems(draw, max_tokens=40):
    num_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, num_experts))
    num_used = draw(st.integers(top_k, num_experts))
    return dict(
        num_tokens=draw(st.integers(1, max_tokens)),
        num_experts=num_experts,
        top_k=top_k,
        dim=draw(st.integers(1, 5)),
        hidden=draw(st.integers(1, 6)),
        num_used=num_used,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _p(num_tokens, num_experts, top_k, num_used, dim=3, hidden=4, seed=0):
    return dict(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, dim=dim, hidden=hidden,
                num_used=num_used, seed=seed)


EDGE_CASES = [
    _p(1, 1, 1, 1),      # one expert, one token
    _p(7, 1, 1, 1),      # one expert, many tokens
    _p(9, 4, 4, 4),      # k = E
    _p(5, 8, 8, 8),      # k = E = 8
    _p(13, 8, 2, 2),     # six experts never chosen
    _p(40, 8, 1, 3),     # top-1, most experts empty
]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@STRATEGIES
@FAST
@given(problems())
@example(EDGE_CASES[0]).via("edge")
@example(EDGE_CASES[1]).via("edge")
@example(EDGE_CASES[2]).via("edge")
@example(EDGE_CASES[3]).via("edge")
@example(EDGE_CASES[4]).via("edge")
@example(EDGE_CASES[5]).via("edge")
def test_dispatch_forward_matches_per_token_loop(strategy, p):
    indices, _, (x, weights, w1, b1, w2, b2) = make_problem(**p)
    out, plan = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=strategy)
    expected = dispatch_ref(x, indices, weights, w1, b1, w2, b2)
    assert out.dtype == F64
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert plan.dropped == 0


@STRATEGIES
def test_dispatch_forward_sums_duplicate_choices_of_one_expert(strategy):
    """A token listing the same expert twice gets that expert's output twice (weights summed)."""
    _, _, (x, _, w1, b1, w2, b2) = make_problem(4, 3, 2, 3, 4, 3, seed=5)
    indices = torch.tensor([[1, 1], [0, 2], [2, 2], [0, 1]])
    weights = torch.rand(4, 2, dtype=F64)
    out, _ = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=strategy)
    torch.testing.assert_close(out, dispatch_ref(x, indices, weights, w1, b1, w2, b2), rtol=1e-10, atol=1e-10)


@STRATEGIES
def test_dispatch_zero_combine_weight_gives_zero_contribution(strategy):
    _, _, (x, _, w1, b1, w2, b2) = make_problem(6, 3, 1, 3, 4, 3, seed=3)
    indices = torch.tensor([[0], [1], [2], [0], [1], [2]])
    weights = torch.zeros(6, 1, dtype=F64)
    out, _ = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=strategy)
    assert torch.equal(out, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@STRATEGIES
@settings(max_examples=25, deadline=None)
@given(problems(max_tokens=20))
@example(EDGE_CASES[0]).via("edge")
@example(EDGE_CASES[2]).via("edge")
@example(EDGE_CASES[4]).via("edge")
def test_dispatch_gradients_match_reference_autograd(strategy, p):
    indices, _, leaves = make_problem(**p, requires_grad=True)
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    probe = torch.randn(p["num_tokens"], p["dim"], generator=gen, dtype=F64)

    out, _ = dispatch_to_experts(leaves[0], indices, *leaves[1:], strategy=strategy)
    got = torch.autograd.grad((out * probe).sum(), leaves)

    expected_out = dispatch_ref(leaves[0], indices, *leaves[1:])
    expected = torch.autograd.grad((expected_out * probe).sum(), leaves)
    # the forward that keeps activations for backward is a separate code path: check it too
    torch.testing.assert_close(out.detach(), expected_out.detach(), rtol=1e-10, atol=1e-10)
    for name, g, e in zip(["x", "weights", "w1", "b1", "w2", "b2"], got, expected):
        assert g is not None, name
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,num_used,capacity",
    [(5, 3, 2, 3, None), (4, 4, 1, 2, None), (3, 1, 1, 1, None), (4, 3, 3, 3, None), (4, 2, 2, 2, 3)],
)
@STRATEGIES
def test_dispatch_gradcheck(strategy, num_tokens, num_experts, top_k, num_used, capacity):
    indices, _, leaves = make_problem(num_tokens, num_experts, top_k, 2, 3, num_used, seed=11, requires_grad=True)

    def fn(x, weights, w1, b1, w2, b2):
        return dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, capacity=capacity, strategy=strategy)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@STRATEGIES
def test_dispatch_gradient_of_only_some_inputs(strategy):
    """Asking for the gradient of x alone (frozen experts) still gives the reference gradient."""
    indices, _, (x, weights, w1, b1, w2, b2) = make_problem(10, 4, 2, 3, 5, 4, seed=2)
    x.requires_grad_(True)
    out, _ = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=strategy)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x)
    (ex,) = torch.autograd.grad(dispatch_ref(x, indices, weights, w1, b1, w2, b2).pow(2).sum(), x)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Empty experts are never read
# ----------------------------------------------------------------------------------------------


@STRATEGIES
@settings(max_examples=25, deadline=None)
@given(problems(max_tokens=24).filter(lambda p: p["num_used"] < p["num_experts"]))
@example(EDGE_CASES[4]).via("edge")
@example(EDGE_CASES[5]).via("edge")
def test_dispatch_never_reads_empty_experts(strategy, p):
    indices, used, (x, weights, w1, b1, w2, b2) = make_problem(**p)
    unused = sorted(set(range(p["num_experts"])) - set(used.tolist()))
    assert unused
    clean_expected = dispatch_ref(x, indices, weights, w1, b1, w2, b2)
    for t in (w1, b1, w2, b2):
        t.data[unused] = float("nan")
        t.requires_grad_(True)
    x.requires_grad_(True)
    weights.requires_grad_(True)

    out, plan = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=strategy)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.detach(), clean_expected, rtol=1e-10, atol=1e-10)
    assert all(plan.counts[e] == 0 for e in unused)

    grads = torch.autograd.grad(out.sum(), (x, weights, w1, b1, w2, b2))
    for g in grads:
        assert torch.isfinite(g).all()
    for g in grads[2:]:
        assert torch.equal(g[unused], torch.zeros_like(g[unused]))


# ----------------------------------------------------------------------------------------------
# plan_dispatch
# ----------------------------------------------------------------------------------------------


def _flat_choices(indices):
    """Expert of every flat slot, choice-major: ``slot = j * S + s``."""
    num_tokens, top_k = indices.shape
    return [int(indices[slot % num_tokens, slot // num_tokens]) for slot in range(num_tokens * top_k)]


@FAST
@given(problems())
@example(EDGE_CASES[0]).via("edge")
@example(EDGE_CASES[3]).via("edge")
@example(EDGE_CASES[4]).via("edge")
def test_plan_dropless_queues_are_contiguous_sorted_and_complete(p):
    indices, _, _ = make_problem(**p)
    num_tokens, top_k, num_experts = p["num_tokens"], p["top_k"], p["num_experts"]
    plan = plan_dispatch(indices, num_experts)
    choice_of_slot = _flat_choices(indices)

    # counts = bincount of the choices, one entry per expert
    expected_counts = [sum(1 for e in choice_of_slot if e == k) for k in range(num_experts)]
    assert list(plan.counts) == expected_counts
    assert plan.dropped == 0

    # every (token, choice) pair appears exactly once
    slots = plan.slot.tolist()
    assert sorted(slots) == list(range(num_tokens * top_k))
    assert plan.token.tolist() == [slot % num_tokens for slot in slots]

    # queues are contiguous, in expert order, and of length counts[e]
    experts_in_order = [choice_of_slot[slot] for slot in slots]
    expected_order = [e for e in range(num_experts) for _ in range(expected_counts[e])]
    assert experts_in_order == expected_order

    # within a queue, first choices come before second choices, then token order
    start = 0
    for count in expected_counts:
        queue = slots[start:start + count]
        assert queue == sorted(queue)
        start += count


@FAST
@given(problems(), st.integers(1, 12))
@example(EDGE_CASES[4], 1).via("edge")
@example(_p(10, 2, 2, 2), 3).via("edge")
def test_plan_with_capacity_keeps_first_choices_first(p, capacity):
    indices, _, _ = make_problem(**p)
    num_tokens, top_k, num_experts = p["num_tokens"], p["top_k"], p["num_experts"]
    plan = plan_dispatch(indices, num_experts, capacity=capacity)
    choice_of_slot = _flat_choices(indices)

    assert all(c <= capacity for c in plan.counts)
    total = num_tokens * top_k
    assert plan.dropped == total - plan.slot.numel()
    assert sum(plan.counts) == plan.slot.numel()

    bincount = [sum(1 for e in choice_of_slot if e == k) for k in range(num_experts)]
    assert list(plan.counts) == [min(c, capacity) for c in bincount]
    assert plan.dropped == sum(max(0, c - capacity) for c in bincount)

    kept = {(slot % num_tokens, slot // num_tokens) for slot in plan.slot.tolist()}
    assert len(kept) == plan.slot.numel()  # no duplicates
    assert kept == kept_pairs_ref(indices, num_experts, capacity)
    assert plan.token.tolist() == [slot % num_tokens for slot in plan.slot.tolist()]

    # kept pairs are still in contiguous, expert-sorted queues
    experts_in_order = [choice_of_slot[slot] for slot in plan.slot.tolist()]
    assert experts_in_order == sorted(experts_in_order)


def test_plan_capacity_drops_second_choices_before_any_first_choice():
    # every token picks expert 0 first and expert 1 second, plus token 3 picks 1 first
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    plan = plan_dispatch(indices, 2, capacity=3)
    kept = {(slot % 4, slot // 4) for slot in plan.slot.tolist()}
    # expert 0: first choices of tokens 0,1,2 kept; token 3's second choice dropped
    # expert 1: token 3's first choice kept, then second choices of tokens 0,1; token 2's dropped
    assert kept == {(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1)}
    assert plan.counts == (3, 3)
    assert plan.dropped == 2


@STRATEGIES
@FAST
@given(problems(max_tokens=24), st.integers(1, 10))
@example(EDGE_CASES[5], 2).via("edge")
def test_dispatch_with_capacity_matches_loop_skipping_dropped_pairs(strategy, p, capacity):
    indices, _, (x, weights, w1, b1, w2, b2) = make_problem(**p)
    kept = kept_pairs_ref(indices, p["num_experts"], capacity)
    out, plan = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, capacity=capacity, strategy=strategy)
    expected = dispatch_ref(x, indices, weights, w1, b1, w2, b2, kept=kept)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert plan.dropped == p["num_tokens"] * p["top_k"] - len(kept)


@STRATEGIES
def test_dispatch_capacity_large_enough_is_dropless(strategy):
    indices, _, (x, weights, w1, b1, w2, b2) = make_problem(12, 4, 2, 3, 4, 4, seed=9)
    out_cap, plan = dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, capacity=24, strategy=strategy)
    assert plan.dropped == 0
    torch.testing.assert_close(out_cap, dispatch_ref(x, indices, weights, w1, b1, w2, b2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,factor,expected",
    [(16, 2, 4, 1.0, 8), (10, 1, 3, 1.0, 4), (10, 1, 3, 1.25, 5), (1, 1, 8, 1.0, 1), (3, 1, 8, 0.01, 1)],
)
def test_expert_capacity_is_ceil_of_factor_times_average_load(num_tokens, top_k, num_experts, factor, expected):
    assert expert_capacity(num_tokens, top_k, num_experts, factor) == expected


def test_strategies_agree_on_long_queues_and_unknown_strategy_is_rejected():
    """Much work per queue (auto picks per-expert) and little (auto picks batched) give one answer."""
    for num_tokens, num_experts, width, picks in ((600, 2, 6, "per_expert"), (40, 8, 6, "batched")):
        indices, _, (x, weights, w1, b1, w2, b2) = make_problem(num_tokens, num_experts, 2, width, width - 1,
                                                                num_experts, seed=3)
        assert choose_strategy(plan_dispatch(indices, num_experts), width, width - 1) == picks
        outs = [dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy=s)[0]
                for s in ("auto", "per_expert", "batched")]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outs[0], outs[2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outs[0], dispatch_ref(x, indices, weights, w1, b1, w2, b2), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match=r"strategy='fast' is not a dispatch strategy; choose one of"):
        dispatch_to_experts(x, indices, weights, w1, b1, w2, b2, strategy="fast")


@pytest.mark.parametrize(
    "num_tokens,num_experts,width,skew,expected",
    [
        (2 * 197, 16, 192, 0.0, "batched"),      # small shape of benchmarks/moe_dispatch.py: ~99 even rows, 192 wide
        (197, 16, 192, 0.0, "batched"),          # m3vit_tiny at 224x224, batch 1: ~49 rows
        (197, 16, 384, 0.0, "batched"),          # ~49 even rows at 384: batched measured 0.70x per-expert
        (1025, 16, 384, 0.0, "per_expert"),      # m3vit_small at 512x512, batch 1: ~256 rows, over the row cap
        (1025, 64, 768, 1.0, "per_expert"),      # m3vit_base E64 at 512x512, uneven (trained-like) queues
        (1025, 64, 192, 0.0, "batched"),         # ~64 even rows at width 192
        (8 * 65, 16, 96, 2.0, "batched"),        # m3vit_micro, 128x128, batch 8: narrow, padding is cheap
        (2 * 197, 16, 192, 2.0, "per_expert"),   # the small shape with uneven queues: padding ~3x the mean
        (2 * 1025, 16, 96, 0.0, "per_expert"),   # 512 rows: over the row cap at any width
    ],
)
def test_auto_strategy_weighs_padding_against_per_expert_cost(num_tokens, num_experts, width, skew, expected):
    """The rule: batched only while a mean queue is under BATCHED_MAX_MEAN_QUEUE rows and the longest
    (what batched pads to) is at most BATCHED_MAX_SKEW x the mean + BATCHED_PADDING_MACS / (D x H) rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(skew, -skew, num_experts)
    plan = plan_dispatch(logits.topk(4, dim=1).indices, num_experts)
    busy = [c for c in plan.counts if c]
    mean_queue = num_tokens * 4 / len(busy)
    rule = (mean_queue < BATCHED_MAX_MEAN_QUEUE
            and max(busy) <= BATCHED_MAX_SKEW * mean_queue + BATCHED_PADDING_MACS / (width * width))
    assert rule == (expected == "batched")
    assert choose_strategy(plan, width, width) == expected


def test_auto_strategy_of_an_empty_plan():
    assert choose_strategy(plan_dispatch(torch.empty(0, 2, dtype=torch.long), 4), 8, 8) == "per_expert"


# ----------------------------------------------------------------------------------------------
# The batched strategy's host-side padded layout: bit for bit the earlier device-side one
# ----------------------------------------------------------------------------------------------


def batched_before_host_layout(x, plan, gate, w1, b1, w2, b2):
    """``_run_batched`` as it was before its padded layout moved to the host (queue positions, the busy
    experts and their renumbering worked out with device ops and a sync), kept as the contract."""
    counts = torch.tensor(plan.counts)
    expert = plan.expert
    nonempty = counts > 0
    if not bool(nonempty.all()):
        used = nonempty.nonzero().squeeze(1)
        w1, b1, w2, b2 = (t.index_select(0, used) for t in (w1, b1, w2, b2))
        expert = (torch.cumsum(nonempty, 0) - 1).index_select(0, expert)
        counts = counts.index_select(0, used)
    experts, longest = w1.shape[0], max(plan.counts)
    starts = torch.cumsum(counts, 0) - counts
    row = expert * longest + torch.arange(expert.numel()) - starts.index_select(0, expert)
    padded_token = torch.zeros(experts * longest, dtype=torch.long).index_put_((row,), plan.token)
    padded_gate = gate.new_zeros(experts * longest).index_put_((row,), gate)
    xs = x.index_select(0, padded_token).view(experts, longest, -1)
    h = torch.nn.functional.gelu(torch.baddbmm(b1.unsqueeze(1), xs, w1))
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(experts * longest, -1)
    return torch.zeros_like(x).index_add_(0, padded_token, y * padded_gate.unsqueeze(1))


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([None, 1, 2, 5]), st.sampled_from(["grad", "no_grad", "inference"]))
@example(EDGE_CASES[4], None, "grad").via("edge")
@example(EDGE_CASES[5], 2, "inference").via("edge")
def test_batched_equals_its_earlier_form_bit_for_bit(p, capacity, mode):
    """Forward (in place under no_grad / inference_mode, out of place with grad) and every gradient equal
    the earlier batched dispatch exactly, over shapes, top-k, idle experts and capacity."""
    from m3vit.nn.dispatch import _run_batched, queued_gates

    indices, _, leaves = make_problem(**p)
    leaves = [t.float().requires_grad_(mode == "grad") for t in leaves]  # float32: rounding shows
    x, weights, w1, b1, w2, b2 = leaves
    plan = plan_dispatch(indices, p["num_experts"], capacity)
    if plan.token.numel() == 0:
        return
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        got = _run_batched(x, plan, queued_gates(weights, plan), w1, b1, w2, b2)
    want = batched_before_host_layout(x, plan, queued_gates(weights, plan), w1, b1, w2, b2)
    assert torch.equal(got, want)
    if mode == "grad":
        probe = torch.randn_like(x)
        got_grads = torch.autograd.grad((got * probe).sum(), leaves)
        want_grads = torch.autograd.grad((want * probe).sum(), leaves)
        for name, g, w in zip(["x", "weights", "w1", "b1", "w2", "b2"], got_grads, want_grads):
            assert torch.equal(g, w), name
