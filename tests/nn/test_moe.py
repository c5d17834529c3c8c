"""The task-level MoE layer: routing, gating, noise, balance loss, gradients and input checks.

Every number is compared with a float64 reference written here from the module's own parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from m3vit.nn import MoE

F64 = torch.float64
ROUTER_KINDS = ["multi_gate", "task_conditioned", "shared"]
# The layer runs in float64 end to end when converted with .double(): compare at float64 accuracy.
TOL = dict(rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------


def gelu_ref(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def as_task_list(task_ids, batch):
    if isinstance(task_ids, int):
        return [task_ids] * batch
    return [int(t) for t in task_ids]


def router_logits_ref(moe: MoE, x: torch.Tensor, task_ids) -> torch.Tensor:
    """Gate logits ``[B*N, E]`` token by token, straight from the router's weights."""
    batch, num_tokens, _ = x.shape
    tasks = as_task_list(task_ids, batch)
    kind = moe.router_kind
    rows = []
    for b in range(batch):
        t = tasks[b]
        if kind == "task_conditioned":
            one_hot = torch.zeros(1, moe.num_tasks, dtype=x.dtype)
            one_hot[0, t] = 1.0
            task_embedding = moe.router.task_embed(one_hot)[0]
        for n in range(num_tokens):
            token = x[b, n]
            if kind == "multi_gate":
                logits = moe.router.weight[t] @ token
            elif kind == "task_conditioned":
                logits = moe.router.gate.weight @ torch.cat([token, task_embedding])
            else:
                logits = moe.router.gate.weight @ token
            rows.append(logits)
    return torch.stack(rows)


def gate_ref(logits: torch.Tensor, top_k: int, renormalize: bool = False):
    """Softmax over all experts, pick the top-k per token; returns probs, weights, indices (lists)."""
    probs = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    probs = probs / probs.sum(dim=1, keepdim=True)
    weights, indices = [], []
    for s in range(logits.shape[0]):
        order = sorted(range(logits.shape[1]), key=lambda e: -float(probs[s, e].detach()))
        picked = order[:top_k]
        w = torch.stack([probs[s, e] for e in picked])
        if renormalize:
            w = w / w.sum()
        weights.append(w)
        indices.append(picked)
    return probs, torch.stack(weights), indices


def top_k_margin(probs: torch.Tensor, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th probability over tokens (inf when k = E)."""
    if top_k >= probs.shape[1]:
        return math.inf
    vals = probs.sort(dim=1, descending=True).values
    return float((vals[:, top_k - 1] - vals[:, top_k]).min())


def experts_ref(moe: MoE, tokens, weights, indices, kept=None):
    rows = []
    for s in range(tokens.shape[0]):
        acc = torch.zeros(tokens.shape[1], dtype=tokens.dtype)
        for j, e in enumerate(indices[s]):
            if kept is not None and (s, j) not in kept:
                continue
            hidden = gelu_ref(tokens[s] @ moe.w1[e] + moe.b1[e])
            acc = acc + weights[s, j] * (hidden @ moe.w2[e] + moe.b2[e])
        rows.append(acc)
    return torch.stack(rows)


def moe_ref(moe: MoE, x, task_ids, renormalize=False):
    """Reference forward: returns output [B, N, D], probs, weights, indices."""
    batch, num_tokens, dim = x.shape
    logits = router_logits_ref(moe, x, task_ids)
    probs, weights, indices = gate_ref(logits, moe.top_k, renormalize)
    out = experts_ref(moe, x.reshape(batch * num_tokens, dim), weights, indices)
    return out.reshape(batch, num_tokens, dim), probs, weights, indices


def cv_squared_ref(v):
    v = [float(a) for a in v]
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return var / (mean**2 + 1e-10)


def balance_ref(probs, indices, rows, num_experts):
    importance = [sum(float(probs[s, e]) for s in rows) for e in range(num_experts)]
    load = [sum(1 for s in rows for picked in indices[s] if picked == e) for e in range(num_experts)]
    return cv_squared_ref(importance) + cv_squared_ref(load)


def aux_ref(probs, indices, token_tasks, num_experts, per_task: bool):
    groups = sorted(set(token_tasks)) if per_task else [None]
    total = 0.0
    for g in groups:
        rows = [s for s, t in enumerate(token_tasks) if g is None or t == g]
        total += balance_ref(probs, indices, rows, num_experts)
    return total


# ----------------------------------------------------------------------------------------------
# Construction helpers
# ----------------------------------------------------------------------------------------------


def make_moe(dim=4, hidden=5, num_experts=4, top_k=2, num_tasks=3, router="multi_gate", seed=0, **kw):
    """A float64 MoE with every parameter redrawn at unit scale (so routing has clear margins)."""
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, num_experts, top_k, num_tasks, router=router, task_embed_dim=6, **kw).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.7)
    return moe


def make_x(batch, num_tokens, dim, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(batch, num_tokens, dim, generator=gen, dtype=F64)


@st.composite
def moe_cases(draw):
    num_experts = draw(st.integers(1, 6))
    num_tasks = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    task_mode = draw(st.sampled_from(["int", "tensor"]))
    if task_mode == "int":
        task_ids = draw(st.integers(0, num_tasks - 1))
    else:
        task_ids = torch.tensor(draw(st.lists(st.integers(0, num_tasks - 1), min_size=batch, max_size=batch)))
    return dict(
        dim=draw(st.integers(1, 5)),
        hidden=draw(st.integers(1, 5)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        num_tasks=num_tasks,
        router=draw(st.sampled_from(ROUTER_KINDS)),
        batch=batch,
        num_tokens=draw(st.integers(1, 6)),
        task_ids=task_ids,
        seed=draw(st.integers(0, 10_000)),
    )


def _case(router, task_ids, batch=3, num_experts=4, top_k=2, num_tasks=3, **kw):
    base = dict(dim=4, hidden=5, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, router=router,
                batch=batch, num_tokens=4, task_ids=task_ids, seed=1)
    base.update(kw)
    return base


# ----------------------------------------------------------------------------------------------
# Forward equals the reference
# ----------------------------------------------------------------------------------------------


@settings(max_examples=35, deadline=None)
@given(moe_cases())
@example(_case("multi_gate", torch.tensor([0, 2, 1]))).via("mixed tasks")
@example(_case("task_conditioned", torch.tensor([2, 0, 2]))).via("mixed tasks")
@example(_case("shared", torch.tensor([1, 0, 2]))).via("mixed tasks")
@example(_case("multi_gate", 1, top_k=4)).via("k = E")
@example(_case("task_conditioned", 0, num_experts=1, top_k=1, num_tasks=1)).via("E = 1")
def test_moe_forward_matches_reference(c):
    moe = make_moe(c["dim"], c["hidden"], c["num_experts"], c["top_k"], c["num_tasks"], c["router"], c["seed"]).eval()
    x = make_x(c["batch"], c["num_tokens"], c["dim"], c["seed"])
    with torch.no_grad():
        expected, probs, weights, indices = moe_ref(moe, x, c["task_ids"])
        assume(top_k_margin(probs, c["top_k"]) > 1e-5)
        out = moe(x, c["task_ids"])
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOL)
    routing = moe.last_routing
    assert [sorted(r) for r in routing["indices"].tolist()] == [sorted(r) for r in indices]
    torch.testing.assert_close(routing["probs"].to(F64), probs, **TOL)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_mixed_task_batch_equals_per_image_forwards(router):
    """Images of different tasks in one batch route exactly as if run alone with their task."""
    moe = make_moe(router=router, seed=4).eval()
    x = make_x(4, 5, 4, seed=4)
    task_ids = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        batched = moe(x, task_ids)
        alone = torch.cat([moe(x[b : b + 1], int(task_ids[b])) for b in range(4)])
    torch.testing.assert_close(batched, alone, **TOL)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_moe_task_dependent_routers_route_tasks_differently(router):
    moe = make_moe(router=router, num_experts=6, top_k=2, seed=2).eval()
    x = make_x(1, 12, 4, seed=2)
    with torch.no_grad():
        moe(x, 0)
        first = moe.last_routing["probs"].clone()
        moe(x, 1)
        second = moe.last_routing["probs"].clone()
    assert not torch.allclose(first, second)
    assert moe.task_dependent


def test_moe_shared_router_ignores_task():
    moe = make_moe(router="shared", seed=2).eval()
    x = make_x(2, 5, 4, seed=2)
    with torch.no_grad():
        a = moe(x, 0)
        b = moe(x, torch.tensor([2, 1]))
    assert torch.equal(a, b)
    assert not moe.task_dependent


@pytest.mark.parametrize("task_ids", [1, torch.tensor(1), torch.tensor([1])])
def test_moe_scalar_task_id_forms_broadcast_over_batch(task_ids):
    moe = make_moe(seed=6).eval()
    x = make_x(3, 4, 4, seed=6)
    with torch.no_grad():
        expected = moe_ref(moe, x, 1)[0]
        out = moe(x, task_ids)
    torch.testing.assert_close(out, expected, **TOL)


# ----------------------------------------------------------------------------------------------
# Gating: softmax over all experts, top-k, combine weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_KINDS)
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_moe_combine_weights_are_unnormalised_picked_probabilities(router, top_k):
    moe = make_moe(num_experts=5, top_k=top_k, router=router, seed=top_k).eval()
    x = make_x(2, 6, 4, seed=top_k)
    task_ids = torch.tensor([0, 2])
    with torch.no_grad():
        _, probs, weights, indices = moe_ref(moe, x, task_ids)
        moe(x, task_ids)
    routing = moe.last_routing
    # probabilities over all experts sum to one
    torch.testing.assert_close(routing["probs"].sum(-1).to(F64), torch.ones(12, dtype=F64), **TOL)
    # weights are the picked probabilities, in the order of the indices
    picked = torch.gather(routing["probs"], 1, routing["indices"])
    torch.testing.assert_close(routing["weights"], picked, rtol=0, atol=0)
    torch.testing.assert_close(routing["weights"].to(F64), weights, **TOL)
    if top_k < 5:
        assert (routing["weights"].sum(-1) < 1 - 1e-4).all()
    else:
        torch.testing.assert_close(routing["weights"].sum(-1).to(F64), torch.ones(12, dtype=F64), **TOL)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_renormalize_makes_weights_sum_to_one(router):
    moe = make_moe(num_experts=5, top_k=2, router=router, seed=8, renormalize=True).eval()
    x = make_x(2, 6, 4, seed=8)
    with torch.no_grad():
        expected, _, weights, _ = moe_ref(moe, x, torch.tensor([1, 0]), renormalize=True)
        out = moe(x, torch.tensor([1, 0]))
    torch.testing.assert_close(moe.last_routing["weights"].sum(-1).to(F64), torch.ones(12, dtype=F64), **TOL)
    torch.testing.assert_close(moe.last_routing["weights"].to(F64), weights, **TOL)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_last_routing_shapes_and_detached(router):
    moe = make_moe(num_experts=5, top_k=3, router=router, seed=1).train()
    x = make_x(2, 7, 4, seed=1).requires_grad_(True)
    moe(x, torch.tensor([0, 1]))
    routing = moe.last_routing
    assert routing["indices"].shape == (14, 3)
    assert routing["indices"].dtype == torch.long
    assert routing["weights"].shape == (14, 3)
    assert routing["probs"].shape == (14, 5)
    for key in ("indices", "weights", "probs"):
        assert not routing[key].requires_grad, key
        assert routing[key].grad_fn is None, key
    assert routing["task_ids"].tolist() == [0] * 7 + [1] * 7
    assert sum(routing["counts"]) == 14 * 3
    assert routing["dropped"] == 0


def test_moe_last_routing_is_none_before_forward():
    assert make_moe().last_routing is None


def test_moe_with_capacity_matches_reference_skipping_dropped_pairs():
    moe = make_moe(num_experts=3, top_k=2, router="shared", seed=3, capacity_factor=0.5).eval()
    x = make_x(2, 6, 4, seed=3)
    with torch.no_grad():
        logits = router_logits_ref(moe, x, 0)
        _, weights, indices = gate_ref(logits, 2)
        capacity = math.ceil(0.5 * 12 * 2 / 3)
        kept = set()
        for e in range(3):
            queue = [(j, s) for j in range(2) for s in range(12) if indices[s][j] == e][:capacity]
            kept.update((s, j) for j, s in queue)
        expected = experts_ref(moe, x.reshape(12, 4), weights, indices, kept=kept).reshape(2, 6, 4)
        out = moe(x, 0)
    assert moe.last_routing["dropped"] == 24 - len(kept) > 0
    assert max(moe.last_routing["counts"]) <= capacity
    torch.testing.assert_close(out, expected, **TOL)


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_noise_is_off_in_eval(router):
    moe = make_moe(num_experts=4, top_k=2, router=router, noise_std=50.0, seed=5).eval()
    x = make_x(2, 8, 4, seed=5)
    with torch.no_grad():
        torch.manual_seed(0)
        a = moe(x, torch.tensor([0, 1]))
        torch.manual_seed(1)
        b = moe(x, torch.tensor([0, 1]))
        expected = moe_ref(moe, x, torch.tensor([0, 1]))[0]
    assert torch.equal(a, b)
    torch.testing.assert_close(a, expected, **TOL)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_noise_changes_routing_in_training(router):
    moe = make_moe(num_experts=4, top_k=2, router=router, noise_std=200.0, seed=5).train()
    x = make_x(2, 16, 4, seed=5)
    torch.manual_seed(0)
    moe(x, 1)
    first = moe.last_routing["indices"].clone()
    torch.manual_seed(1)
    moe(x, 1)
    second = moe.last_routing["indices"].clone()
    assert not torch.equal(first, second)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_noisy_training_output_uses_the_recorded_routing(router):
    """With noise, the output is still the expert mixture under the routing the layer reports."""
    moe = make_moe(num_experts=4, top_k=2, router=router, noise_std=20.0, seed=7).train()
    x = make_x(2, 5, 4, seed=7)
    torch.manual_seed(3)
    out = moe(x, torch.tensor([0, 2]))
    routing = moe.last_routing
    with torch.no_grad():
        expected = experts_ref(moe, x.reshape(10, 4), routing["weights"].to(F64), routing["indices"].tolist())
    torch.testing.assert_close(out.detach(), expected.reshape(2, 5, 4), **TOL)


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_zero_noise_training_is_deterministic(router):
    moe = make_moe(num_experts=4, top_k=2, router=router, noise_std=0.0, seed=5).train()
    x = make_x(2, 8, 4, seed=5)
    torch.manual_seed(0)
    a = moe(x, torch.tensor([2, 1]))
    torch.manual_seed(1)
    b = moe(x, torch.tensor([2, 1]))
    assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(a.detach(), moe_ref(moe, x, torch.tensor([2, 1]))[0], **TOL)


# ----------------------------------------------------------------------------------------------
# Balance loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_aux_loss_zero_for_uniform_probs_and_full_load(router):
    """Zero router weights make probs uniform; top_k = E makes every expert's load equal."""
    moe = make_moe(num_experts=4, top_k=4, router=router, seed=1).train()
    with torch.no_grad():
        for name, p in moe.router.named_parameters():
            if name in ("weight", "gate.weight"):
                p.zero_()
    moe(make_x(2, 6, 4), 0)
    assert moe.aux_loss().detach().item() == pytest.approx(0.0, abs=1e-10)


def test_aux_loss_near_zero_for_balanced_top1_routing():
    """Tiny one-hot tokens: probs nearly uniform and tokens split evenly over the experts."""
    num_experts = 4
    moe = make_moe(dim=num_experts, num_experts=num_experts, top_k=1, num_tasks=1, seed=1).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(num_experts, dtype=F64).unsqueeze(0))
    tokens = torch.eye(num_experts, dtype=F64).repeat(3, 1) * 1e-3  # 12 tokens, 3 per expert
    moe(tokens.unsqueeze(0), 0)
    assert moe.last_routing["counts"] == (3, 3, 3, 3)
    assert 0.0 <= moe.aux_loss().detach().item() < 1e-6


@pytest.mark.parametrize("num_experts", [2, 4, 6])
def test_aux_loss_large_when_router_collapses(num_experts):
    """All tokens to one expert with probability ~1: cv^2 of a one-hot vector is E - 1, twice."""
    moe = make_moe(dim=3, num_experts=num_experts, top_k=1, router="shared", seed=2).train()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0].fill_(100.0)
    x = make_x(2, 5, 3).abs() + 0.5
    moe(x, 0)
    assert moe.last_routing["counts"][0] == 10
    assert moe.aux_loss().detach().item() == pytest.approx(2 * (num_experts - 1), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(moe_cases())
@example(_case("multi_gate", torch.tensor([0, 2, 0]))).via("mixed tasks")
@example(_case("task_conditioned", torch.tensor([1, 1, 0]))).via("mixed tasks")
@example(_case("shared", torch.tensor([1, 0, 2]))).via("mixed tasks")
def test_aux_loss_matches_hand_formula(c):
    moe = make_moe(c["dim"], c["hidden"], c["num_experts"], c["top_k"], c["num_tasks"], c["router"], c["seed"]).train()
    x = make_x(c["batch"], c["num_tokens"], c["dim"], c["seed"])
    with torch.no_grad():
        logits = router_logits_ref(moe, x, c["task_ids"])
        probs, _, indices = gate_ref(logits, moe.top_k)
    assume(top_k_margin(probs, c["top_k"]) > 1e-5)
    moe(x, c["task_ids"])
    token_tasks = [t for t in as_task_list(c["task_ids"], c["batch"]) for _ in range(c["num_tokens"])]
    expected = aux_ref(probs, indices, token_tasks, c["num_experts"], per_task=c["router"] != "shared")
    assert moe.aux_loss().detach().item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_aux_loss_of_mixed_batch_is_sum_of_per_task_losses(router):
    moe = make_moe(num_experts=5, top_k=2, router=router, seed=9).train()
    x = make_x(5, 6, 4, seed=9)
    task_ids = torch.tensor([0, 2, 0, 2, 2])
    moe(x, task_ids)
    mixed = moe.aux_loss().detach().item()

    per_task = 0.0
    for t in (0, 2):
        moe(x[task_ids == t], t)
        per_task += moe.aux_loss().detach().item()
    assert mixed == pytest.approx(per_task, rel=1e-5)

    # the per-task grouping matters here: one group over the whole batch gives another number
    with torch.no_grad():
        probs, _, indices = gate_ref(router_logits_ref(moe, x, task_ids), 2)
    whole_batch = aux_ref(probs, indices, [0] * 30, 5, per_task=False)
    assert abs(whole_batch - mixed) > 1e-3


def test_aux_loss_shared_router_treats_mixed_batch_as_one_group():
    moe = make_moe(num_experts=5, top_k=2, router="shared", seed=9).train()
    x = make_x(4, 6, 4, seed=9)
    task_ids = torch.tensor([0, 2, 1, 2])
    moe(x, task_ids)
    with torch.no_grad():
        probs, _, indices = gate_ref(router_logits_ref(moe, x, task_ids), 2)
    token_tasks = [int(t) for t in task_ids for _ in range(6)]
    assert moe.aux_loss().detach().item() == pytest.approx(aux_ref(probs, indices, token_tasks, 5, per_task=False), rel=1e-4)
    assert abs(aux_ref(probs, indices, token_tasks, 5, per_task=True) - moe.aux_loss().detach().item()) > 1e-3


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_aux_loss_is_zero_in_eval_and_before_forward(router):
    moe = make_moe(num_experts=4, top_k=1, router=router, seed=3)
    assert moe.aux_loss().detach().item() == 0.0
    x = make_x(2, 6, 4, seed=3)
    moe.train()
    moe(x, 0)
    assert moe.aux_loss().detach().item() > 0.0
    moe.eval()
    with torch.no_grad():
        moe(x, 0)
    assert moe.aux_loss().detach().item() == 0.0


def test_aux_loss_gradient_reaches_router():
    moe = make_moe(num_experts=4, top_k=1, router="multi_gate", seed=3).train()
    moe(make_x(2, 6, 4, seed=3), 1)
    moe.aux_loss().backward()
    grad = moe.router.weight.grad
    assert grad is not None and grad[1].abs().sum() > 0
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))


def normal_cdf_ref(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("router,top_k", [("multi_gate", 1), ("task_conditioned", 2), ("shared", 2), ("multi_gate", 4)])
def test_noisy_aux_loss_matches_smooth_load_formula(router, top_k):
    """Noisy gating: load_e = sum_s Phi((clean_e - threshold_e) / scale), threshold_e the k-th largest
    noisy logit among the *other* experts; importance = sum of the noisy softmax.

    The noise is reconstructed by replaying the global RNG (the layer draws one ``randn`` of shape
    ``[B*N, E]`` in its gate dtype and scales it by ``noise_std / E``); the replay is checked against
    the reported probabilities before the loss is compared.
    """
    num_experts, noise_std = 4, 2.0
    moe = make_moe(num_experts=num_experts, top_k=top_k, router=router, noise_std=noise_std, seed=21).train()
    x = make_x(3, 4, 4, seed=21)
    task_ids = torch.tensor([0, 2, 0])
    scale = noise_std / num_experts
    torch.manual_seed(123)
    moe(x, task_ids)
    torch.manual_seed(123)  # replay in the dtype the gate ran in (that of the reported probs)
    noise = torch.randn(12, num_experts, dtype=moe.last_routing["probs"].dtype).to(F64) * scale

    with torch.no_grad():
        clean = router_logits_ref(moe, x, task_ids)
    noisy = clean + noise
    probs, _, indices = gate_ref(noisy, top_k)
    torch.testing.assert_close(moe.last_routing["probs"].to(F64), probs, **TOL,
                               msg="noise replay does not reproduce the layer's routing")

    load = torch.zeros(12, num_experts, dtype=F64)
    for s in range(12):
        for e in range(num_experts):
            others = sorted((float(noisy[s, o]) for o in range(num_experts) if o != e), reverse=True)
            if top_k >= num_experts:
                load[s, e] = 1.0
            else:
                load[s, e] = normal_cdf_ref((float(clean[s, e]) - others[top_k - 1]) / scale)
    token_tasks = [int(t) for t in task_ids for _ in range(4)]
    per_task = router != "shared"
    groups = sorted(set(token_tasks)) if per_task else [None]
    expected = 0.0
    for g in groups:
        rows = [s for s, t in enumerate(token_tasks) if g is None or t == g]
        importance = [sum(float(probs[s, e]) for s in rows) for e in range(num_experts)]
        group_load = [sum(float(load[s, e]) for s in rows) for e in range(num_experts)]
        expected += cv_squared_ref(importance) + cv_squared_ref(group_load)
    assert moe.aux_loss().detach().item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_noisy_aux_loss_is_finite_and_differentiable():
    moe = make_moe(num_experts=4, top_k=2, router="task_conditioned", noise_std=1.0, seed=3).train()
    torch.manual_seed(0)
    moe(make_x(2, 6, 4, seed=3), torch.tensor([0, 1]))
    loss = moe.aux_loss()
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_moe_gradients_match_reference(router):
    moe = make_moe(num_experts=4, top_k=2, router=router, seed=12).eval()
    x = make_x(3, 4, 4, seed=12).requires_grad_(True)
    task_ids = torch.tensor([1, 0, 1])
    probe = make_x(3, 4, 4, seed=13)
    params = [p for _, p in moe.named_parameters()]

    expected_out = moe_ref(moe, x, task_ids)[0]
    expected = torch.autograd.grad((expected_out * probe).sum(), [x] + params, allow_unused=True)
    out = moe(x, task_ids)
    got = torch.autograd.grad((out * probe).sum(), [x] + params, allow_unused=True)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, g, e in zip(names, got, expected):
        if e is None:
            assert g is None or torch.equal(g, torch.zeros_like(g)), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_moe_multi_gate_grads_only_for_used_tasks_and_chosen_experts():
    moe = make_moe(num_experts=6, top_k=1, num_tasks=4, router="multi_gate", seed=14).train()
    x = make_x(3, 2, 4, seed=14)
    out = moe(x, torch.tensor([0, 2, 0]))
    (out * make_x(3, 2, 4, seed=15)).sum().backward()
    grad = moe.router.weight.grad
    for t in (0, 2):
        assert grad[t].abs().sum() > 0, t
    for t in (1, 3):
        assert torch.equal(grad[t], torch.zeros_like(grad[t])), t
    chosen = set(moe.last_routing["indices"].flatten().tolist())
    assert len(chosen) < 6
    for e in range(6):
        for p in (moe.w1, moe.b1, moe.w2, moe.b2):
            if e in chosen:
                assert p.grad[e].abs().sum() > 0
            else:
                assert torch.equal(p.grad[e], torch.zeros_like(p.grad[e]))


def test_moe_task_conditioned_grads_reach_task_embedding():
    moe = make_moe(num_experts=4, top_k=2, num_tasks=3, router="task_conditioned", seed=16).train()
    out = moe(make_x(2, 5, 4, seed=16), torch.tensor([0, 1]))
    ((out * make_x(2, 5, 4, seed=17)).sum() + moe.aux_loss()).backward()
    for name, p in moe.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    first_linear = moe.router.task_embed[0].weight.grad  # [embed, num_tasks]
    assert first_linear[:, 0].abs().sum() > 0 and first_linear[:, 1].abs().sum() > 0
    assert torch.equal(first_linear[:, 2], torch.zeros_like(first_linear[:, 2]))
    # the token half and the task half of the gate both learn
    assert moe.router.gate.weight.grad[:, :4].abs().sum() > 0
    assert moe.router.gate.weight.grad[:, 4:].abs().sum() > 0


def test_moe_shared_router_and_experts_get_grads():
    moe = make_moe(num_experts=3, top_k=2, router="shared", seed=18).train()
    out = moe(make_x(2, 5, 4, seed=18), 0)
    (out.pow(2).sum() + moe.aux_loss()).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    for p in (moe.w1, moe.b1, moe.w2, moe.b2):
        assert p.grad.abs().sum() > 0


def test_moe_float64_module_routes_in_float64():
    """A module converted with ``.double()`` should route in float64 (gradcheck needs it)."""
    moe = make_moe(num_experts=4, top_k=2, router="multi_gate", seed=19).eval()
    x = make_x(2, 3, 4, seed=19).requires_grad_(True)
    with torch.no_grad():
        moe(x, torch.tensor([0, 1]))
    assert moe.last_routing["probs"].dtype == F64
    assert moe.last_routing["weights"].dtype == F64


def test_moe_float64_module_passes_gradcheck():
    """Gradcheck of the whole layer w.r.t. its input (fails if routing is silently done in float32)."""
    moe = make_moe(num_experts=4, top_k=2, router="multi_gate", seed=19).eval()
    x = make_x(2, 3, 4, seed=19).requires_grad_(True)
    ok = torch.autograd.gradcheck(
        lambda t: moe(t, torch.tensor([0, 1])), (x,), eps=1e-6, atol=1e-6, rtol=1e-5, raise_exception=False
    )
    assert ok, "analytic and numerical Jacobians of the float64 MoE disagree"


def test_moe_float32_forward_matches_reference():
    moe = make_moe(num_experts=4, top_k=2, router="task_conditioned", seed=20).float().eval()
    x = make_x(2, 5, 4, seed=20)
    with torch.no_grad():
        out = moe(x.float(), torch.tensor([2, 1]))
        expected = moe_ref(make_moe(num_experts=4, top_k=2, router="task_conditioned", seed=20), x, torch.tensor([2, 1]))[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [5, 0, -1])
def test_moe_rejects_top_k_outside_range(top_k):
    with pytest.raises(ValueError, match=r"top_k"):
        MoE(4, 5, 4, top_k)


def test_moe_rejects_unknown_router_listing_valid_ones():
    with pytest.raises(ValueError, match=r"nope") as info:
        MoE(4, 5, 4, 2, router="nope")
    for kind in ROUTER_KINDS:
        assert kind in str(info.value)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_tasks=0), "num_tasks"),
    (dict(noise_std=-0.1), "noise_std"),
    (dict(capacity_factor=0.0), "capacity_factor"),
])
def test_moe_rejects_bad_constructor_arguments(kwargs, pattern):
    args = dict(dim=4, hidden_dim=5, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        MoE(**args)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 3), (6, 4), (1, 2, 3, 4)])
def test_moe_rejects_x_of_wrong_shape(shape):
    moe = MoE(4, 5, 4, 2)
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        moe(torch.randn(*shape), 0)


@pytest.mark.parametrize("router", ROUTER_KINDS)
@pytest.mark.parametrize("task_ids", [3, -1, torch.tensor([0, 3]), torch.tensor([-1, 0])])
def test_moe_rejects_task_id_out_of_range(router, task_ids):
    moe = MoE(4, 5, 4, 2, num_tasks=3, router=router)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        moe(torch.randn(2, 3, 4), task_ids)


def test_moe_rejects_task_ids_of_wrong_length():
    moe = MoE(4, 5, 4, 2, num_tasks=3)
    with pytest.raises(ValueError, match=r"task_ids has 3 entries for a batch of 2"):
        moe(torch.randn(2, 3, 4), torch.tensor([0, 1, 2]))


def test_moe_rejects_task_ids_of_wrong_type():
    moe = MoE(4, 5, 4, 2, num_tasks=3)
    with pytest.raises(TypeError, match=r"task_ids"):
        moe(torch.randn(2, 3, 4), "seg")


# ----------------------------------------------------------------------------------------------
# The official M³ViT's balance loss and initialisation (balance_loss="reference", init="reference")
# ----------------------------------------------------------------------------------------------


def cv_squared_unbiased_ref(v):
    """The official gate's cv²: sample variance (N - 1) over (mean² + 1e-10); 0 for one value."""
    v = [float(a) for a in v]
    if len(v) == 1:
        return 0.0
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
    return var / (mean**2 + 1e-10)


def reference_balance_ref(probs, weights, indices, rows, num_experts):
    """importance = Σ over tokens of the sparse gate vector (each token's combine weights at its picked
    experts, zero elsewhere); load = number of (token, choice) pairs per expert."""
    importance = [0.0] * num_experts
    load = [0] * num_experts
    for s in rows:
        for j, e in enumerate(indices[s]):
            importance[e] += float(weights[s][j])
            load[e] += 1
    return cv_squared_unbiased_ref(importance) + cv_squared_unbiased_ref(load)


@settings(max_examples=30, deadline=None)
@given(moe_cases(), st.booleans())
@example(_case("multi_gate", torch.tensor([0, 2, 0])), False).via("mixed tasks")
@example(_case("task_conditioned", torch.tensor([1, 1, 0])), False).via("mixed tasks")
@example(_case("shared", torch.tensor([1, 0, 2])), True).via("one group, renormalised")
@example(_case("multi_gate", 0, num_experts=1, top_k=1), False).via("E = 1: cv² is 0")
def test_reference_balance_loss_matches_the_official_formula(c, renormalize):
    moe = make_moe(c["dim"], c["hidden"], c["num_experts"], c["top_k"], c["num_tasks"], c["router"], c["seed"],
                   balance_loss="reference", renormalize=renormalize).train()
    x = make_x(c["batch"], c["num_tokens"], c["dim"], c["seed"])
    with torch.no_grad():
        logits = router_logits_ref(moe, x, c["task_ids"])
        probs, weights, indices = gate_ref(logits, moe.top_k, renormalize)
    assume(top_k_margin(probs, c["top_k"]) > 1e-5)
    moe(x, c["task_ids"])
    token_tasks = [t for t in as_task_list(c["task_ids"], c["batch"]) for _ in range(c["num_tokens"])]
    groups = sorted(set(token_tasks)) if c["router"] != "shared" else [None]
    expected = sum(reference_balance_ref(probs, weights, indices,
                                         [s for s, t in enumerate(token_tasks) if g is None or t == g],
                                         c["num_experts"]) for g in groups)
    assert moe.aux_loss().detach().item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_reference_and_vmoe_balance_losses_differ_where_the_formulas_do():
    """Teeth: with top-k < E the sparse and the dense importance differ, and so do the variances."""
    losses = {}
    for kind in ("reference", "vmoe"):
        moe = make_moe(num_experts=5, top_k=2, router="shared", seed=3, balance_loss=kind).train()
        x = make_x(2, 6, 4, seed=3)
        moe(x, 0)
        losses[kind] = moe.aux_loss().item()
        with torch.no_grad():
            probs, weights, indices = gate_ref(router_logits_ref(moe, x, 0), 2)
        rows = range(12)
        if kind == "vmoe":
            assert losses[kind] == pytest.approx(balance_ref(probs, indices, rows, 5), rel=1e-6)
        else:
            assert losses[kind] == pytest.approx(reference_balance_ref(probs, weights, indices, rows, 5), rel=1e-6)
    assert abs(losses["reference"] - losses["vmoe"]) > 1e-3


def test_cv_squared_variants():
    from m3vit.nn import cv_squared

    v = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    assert cv_squared(v, unbiased=True).item() == pytest.approx(cv_squared_unbiased_ref(v), rel=1e-12)
    assert cv_squared(v).item() == pytest.approx(cv_squared_ref(v), rel=1e-12)
    assert cv_squared(torch.tensor([3.0]), unbiased=True).item() == 0.0  # the official single-expert case


def kaiming_uniform_bound(shape, a=math.sqrt(5)):
    """Bound of ``torch.nn.init.kaiming_uniform_(w, a)`` (fan-in mode) from its definition:
    gain = √(2 / (1 + a²)), fan-in = size(1) · ∏ size(2:), bound = gain · √(3 / fan-in)."""
    fan_in = shape[1] * math.prod(shape[2:])
    return math.sqrt(2.0 / (1.0 + a * a)) * math.sqrt(3.0 / fan_in)


def assert_uniform(w, bound):
    w = w.detach().double().flatten()
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.abs().max().item() >= 0.9 * bound  # thousands of draws reach the edge
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.15)  # U(-b, b) has variance b² / 3
    assert abs(w.mean().item()) < 0.1 * bound


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_reference_init_is_the_official_gate_and_fastmoe_expert_init(router):
    dim, hidden, experts, tasks = 24, 40, 16, 3
    torch.manual_seed(0)
    moe = MoE(dim, hidden, experts, 4, tasks, router=router, task_embed_dim=8, init="reference")
    # official gate: w_gate [d_gate, E] (d_gate = D, or D + embedding for task-conditioned routing)
    gate = moe.router.weight if router == "multi_gate" else moe.router.gate.weight
    d_gate = dim + (8 if router == "task_conditioned" else 0)
    bound = kaiming_uniform_bound((d_gate, experts))
    assert bound == pytest.approx(1 / math.sqrt(experts))
    assert_uniform(gate, bound)
    # FastMoE's FMoELinear: weight [E, out, in], htoh4 (in = D, out = hidden) and h4toh alike
    bound = kaiming_uniform_bound((experts, hidden, dim))
    assert bound == pytest.approx(1 / math.sqrt(dim * hidden))
    assert kaiming_uniform_bound((experts, dim, hidden)) == pytest.approx(bound)
    assert_uniform(moe.w1, bound)
    assert_uniform(moe.w2, bound)
    assert not moe.b1.any() and not moe.b2.any()


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_trunc_normal_init_is_kept_as_an_option(router):
    torch.manual_seed(0)
    moe = MoE(24, 40, 16, 4, 3, router=router, init="trunc_normal")
    gate = moe.router.weight if router == "multi_gate" else moe.router.gate.weight
    for w in (gate, moe.w1, moe.w2):  # N(0, 0.02²) truncated at ±2 (absolute, so hardly truncated)
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
        assert abs(w.mean().item()) < 0.002


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(balance_loss="switch"), r"balance_loss='switch' is not allowed; choose one of \['reference', 'vmoe'\]"),
    (dict(init="xavier"), r"init='xavier' is not allowed; choose one of \['reference', 'trunc_normal'\]"),
])
def test_moe_rejects_unknown_reference_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoE(4, 5, 4, 2, **kwargs)


# Zero tokens
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ROUTER_KINDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (0, 0, 4)])
@pytest.mark.parametrize("task_ids", [1, "tensor"])
@pytest.mark.parametrize("training", [True, False])
def test_moe_with_zero_tokens_returns_an_empty_output(router, shape, task_ids, training):
    moe = make_moe(router=router, noise_std=0.5).train(training)
    if task_ids == "tensor":
        task_ids = torch.ones(shape[0], dtype=torch.long)
    x = torch.zeros(*shape, dtype=F64)
    out = moe(x, task_ids)
    assert out.shape == shape and out.dtype == F64
    routing = moe.last_routing
    assert routing["indices"].shape == (0, 2) and routing["probs"].shape == (0, 4)
    assert sum(routing["counts"]) == 0 and routing["dropped"] == 0
    aux = moe.aux_loss()
    assert torch.isfinite(aux) and aux.item() == 0.0


def test_moe_checks_an_int_task_id_without_building_a_tensor():
    moe = make_moe(num_tasks=3)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
            moe(make_x(0, 2, 4), bad)
