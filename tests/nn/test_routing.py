"""MoE = router + expert backend: ``MoE.route`` (the one routing implementation) against a float64 loop,
``MoE.forward`` (route, then the resident backend) bit for bit against the pre-split monolithic forward
in every router, dispatch strategy, mode and option, and the routers' one-task extraction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from m3vit.nn import MoE, Routing, balance_loss, dispatch_to_experts, expert_capacity
from m3vit.nn.routers import MultiGateRouter, SharedRouter, TaskConditionedRouter, TaskEmbedding

F64 = torch.float64
ROUTERS = ["multi_gate", "task_conditioned", "shared"]
STRATEGIES = ["per_expert", "batched", "auto"]
MODES = ["eval", "train", "train_noise"]


# ----------------------------------------------------------------------------------------------
# The pre-split forward, kept as the behaviour contract
# ----------------------------------------------------------------------------------------------


def monolithic_forward(moe: MoE, x: torch.Tensor, task_ids):
    """``MoE.forward`` as it was written before routing and expert compute were split (routing, noise,
    softmax, top-k, noisy load and grouped balance loss inline), with the public dispatch op.
    Returns ``(out, last_routing, aux_loss)``; draws the gate noise in the same order."""
    batch, num_tokens, _ = x.shape
    rows = batch * num_tokens
    if isinstance(task_ids, int):
        task_ids = torch.full((batch,), task_ids, dtype=torch.long)
    logits = moe.router(x, task_ids).reshape(rows, moe.router_experts)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    noisy = moe.training and moe.noise_std > 0
    noise_scale = moe.noise_std / moe.router_experts
    gate_logits = logits + torch.randn_like(logits) * noise_scale if noisy else logits
    probs = torch.softmax(gate_logits, dim=-1)
    held = list(range(moe.router_experts)) if moe.expert_ids is None else list(moe.expert_ids)
    if moe.expert_ids is not None:
        probs = probs.index_select(-1, torch.tensor(held))
    weights, indices = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    capacity = None
    if moe.capacity_factor is not None:
        capacity = expert_capacity(rows, moe.top_k, moe.num_experts, moe.capacity_factor)
    out, plan = dispatch_to_experts(x.reshape(rows, moe.dim), indices, weights, moe.w1, moe.b1, moe.w2, moe.b2,
                                    capacity, strategy=moe.dispatch)
    token_tasks = task_ids.repeat_interleave(num_tokens)
    aux = None
    if moe.training:
        load = None
        if noisy:
            clean, noisy_held = logits[:, held], gate_logits[:, held]
            if moe.top_k >= len(held):
                load = torch.ones_like(clean)
            else:
                top = noisy_held.topk(moe.top_k + 1, dim=-1).values
                kth, next_ = top[:, moe.top_k - 1: moe.top_k], top[:, moe.top_k: moe.top_k + 1]
                load = torch.special.ndtr((clean - torch.where(noisy_held >= kth, next_, kth)) / noise_scale)
        groups = token_tasks.unique().tolist() if moe.task_dependent else [None]
        if len(groups) == 1:
            aux = balance_loss(probs, indices, load, weights=weights, kind=moe.balance_loss_kind)
        else:
            aux = probs.new_zeros(())
            for g in groups:
                r = (token_tasks == g).nonzero().squeeze(1)
                aux = aux + balance_loss(probs[r], indices[r], None if load is None else load[r],
                                         weights=weights[r], kind=moe.balance_loss_kind)
    routing = {"indices": indices, "weights": weights, "probs": probs, "task_ids": token_tasks,
               "counts": plan.counts, "dropped": plan.dropped}
    return out.reshape(batch, num_tokens, moe.dim), routing, aux


def _layer(router, dispatch, mode, expert_ids, capacity_factor, renormalize):
    torch.manual_seed(0)
    moe = MoE(12, 10, 6, 2, num_tasks=3, router=router, noise_std=1.0 if mode == "train_noise" else 0.0,
              renormalize=renormalize, capacity_factor=capacity_factor, dispatch=dispatch, expert_ids=expert_ids,
              balance_loss="reference" if renormalize else "vmoe")
    return moe.train(mode != "eval")


def _forward_and_grads(forward, moe, x, task_ids, seed=5):
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the gate noise
    out, routing, aux = forward(moe, x, task_ids)
    grads = {}
    if moe.training:
        (out.square().sum() + aux).backward()
        grads = {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}
        grads["x"] = x.grad
    return out.detach(), routing, aux, grads


def _split_forward(moe, x, task_ids):
    out = moe(x, task_ids)
    return out, moe.last_routing, moe.aux_loss() if moe.training else None


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_the_monolithic_forward_bit_for_bit(router, mode):
    """Every dispatch strategy, held-expert subset, capacity, renormalisation and task form: outputs,
    routing record, aux loss and every gradient are bit-identical to the pre-split forward."""
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    for dispatch, ids, cap, task_ids in itertools.product(STRATEGIES, [None, (0, 2, 3, 5)], [None, 0.75],
                                                          [1, torch.tensor([0, 2, 0])]):
        case = (dispatch, ids, cap, task_ids)
        moe = _layer(router, dispatch, mode, ids, cap, renormalize=cap is not None)
        want = _forward_and_grads(monolithic_forward, moe, x, task_ids)
        got = _forward_and_grads(_split_forward, moe, x, task_ids)
        assert torch.equal(got[0], want[0]), case
        assert got[1].keys() == want[1].keys()
        for key in ("indices", "weights", "probs", "task_ids"):
            assert torch.equal(got[1][key], want[1][key]), (case, key)
        assert (got[1]["counts"], got[1]["dropped"]) == (want[1]["counts"], want[1]["dropped"]), case
        if mode == "eval":
            assert got[2] is None and want[2] is None
            continue
        assert torch.equal(got[2], want[2]), case
        assert got[3].keys() == want[3].keys(), case
        for name in want[3]:
            assert torch.equal(got[3][name], want[3][name]), (case, name)


@pytest.mark.parametrize("router", ROUTERS)
def test_an_int_task_routes_exactly_as_a_tensor_of_that_task(router):
    """The host-side ``int`` path (no device sync; what tracing uses) gives the tensor path's numbers,
    gradients included."""
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    moe = _layer(router, "per_expert", "train", None, None, False)
    a = _forward_and_grads(_split_forward, moe, x, 2)
    b = _forward_and_grads(_split_forward, moe, x, torch.tensor([2, 2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    for name in a[3]:
        assert torch.equal(a[3][name], b[3][name]), name


# ----------------------------------------------------------------------------------------------
# route() against a float64 plain loop
# ----------------------------------------------------------------------------------------------


def _logits_ref(moe: MoE, x, tasks):
    rows = []
    for b in range(x.shape[0]):
        t = tasks[b]
        for n in range(x.shape[1]):
            token = x[b, n]
            if moe.router_kind == "multi_gate":
                rows.append(moe.router.weight[t] @ token)
            elif moe.router_kind == "task_conditioned":
                one_hot = torch.zeros(1, moe.num_tasks, dtype=F64)
                one_hot[0, t] = 1.0
                rows.append(moe.router.gate.weight @ torch.cat([token, moe.router.task_embed(one_hot)[0]]))
            else:
                rows.append(moe.router.gate.weight @ token)
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), router=st.sampled_from(ROUTERS), num_experts=st.integers(1, 6),
       top_k=st.integers(1, 6), num_tasks=st.integers(1, 3), batch=st.integers(1, 3), tokens=st.integers(1, 5),
       task_form=st.sampled_from(["int", "tensor"]), subset=st.integers(0, 63), renormalize=st.booleans())
def test_route_matches_a_float64_loop(seed, router, num_experts, top_k, num_tasks, batch, tokens, task_form, subset,
                                      renormalize):
    ids = [e for e in range(num_experts) if subset >> e & 1] or None
    held = ids or list(range(num_experts))
    top_k = min(top_k, len(held))
    torch.manual_seed(seed)
    moe = MoE(4, 3, num_experts, top_k, num_tasks, router=router, task_embed_dim=5, renormalize=renormalize,
              expert_ids=ids).double().eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(batch, tokens, 4, dtype=F64)
    tasks = [seed % num_tasks] * batch if task_form == "int" else [(seed + b) % num_tasks for b in range(batch)]
    task_ids = tasks[0] if task_form == "int" else torch.tensor(tasks)
    with torch.no_grad():
        routing = moe.route(x, task_ids)
        logits = _logits_ref(moe, x, tasks)
    assert isinstance(routing, Routing)
    assert routing.task == (tasks[0] if task_form == "int" else None)
    assert routing.token_tasks.tolist() == [t for t in tasks for _ in range(tokens)]
    for s in range(batch * tokens):
        denominator = sum(math.exp(float(v)) for v in logits[s])
        probs = [math.exp(float(logits[s, e])) / denominator for e in held]
        order = sorted(range(len(held)), key=lambda j: -probs[j])
        assume(top_k == len(held) or probs[order[top_k - 1]] - probs[order[top_k]] > 1e-9)
        picked = order[:top_k]
        weights = [probs[j] for j in picked]
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        assert routing.indices[s].tolist() == picked
        assert routing.weights[s].tolist() == pytest.approx(weights, rel=1e-12, abs=1e-14)
        assert routing.probs[s].tolist() == pytest.approx(probs, rel=1e-12, abs=1e-14)
    counts = [routing.indices.reshape(-1).tolist().count(e) for e in range(len(held))]
    assert list(routing.plan.counts) == counts


def test_route_builds_no_dispatch_plan_until_asked():
    """The plan (a host sync) is a backend's to ask for: routing alone never builds it."""
    moe = MoE(6, 5, 4, 2, num_tasks=2).eval()
    routing = moe.route(torch.randn(2, 3, 6), 1)
    assert "plan" not in vars(routing)
    assert sum(routing.plan.counts) == 2 * 3 * 2 and "plan" in vars(routing)


# ----------------------------------------------------------------------------------------------
# One-task extraction of a router
# ----------------------------------------------------------------------------------------------


def _router(kind, num_experts, num_tasks, shared_embed=None):
    torch.manual_seed(3)
    if kind == "multi_gate":
        return MultiGateRouter(8, num_experts, num_tasks)
    if kind == "shared":
        return SharedRouter(8, num_experts, num_tasks)
    return TaskConditionedRouter(8, num_experts, num_tasks, task_embed_dim=6, task_embed=shared_embed)


@pytest.mark.parametrize("kind", ROUTERS)
@pytest.mark.parametrize("experts", [None, [0, 2, 4]])
def test_an_extracted_router_gives_its_tasks_logits(kind, experts):
    """The one-task router loaded from ``extract_task_state(t, experts)`` gives task t's logits of the
    full router (only the kept experts' columns), bit for bit except the task-conditioned embedding MLP,
    which runs on one row instead of T (float rounding)."""
    full = _router(kind, 5, 3).eval()
    x = torch.randn(2, 4, 8)
    rows = None if experts is None else torch.tensor(experts)
    for task in range(3):
        one = _router(kind, 5 if experts is None else len(experts), 1).eval()
        one.load_state_dict(full.extract_task_state(task, rows), strict=True)
        with torch.no_grad():
            want = full(x, task)
            want = want if rows is None else want.index_select(-1, rows)
            got = one(x, 0)
        if kind == "task_conditioned":
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)


def test_a_router_sharing_the_models_embedding_leaves_it_to_the_model():
    embed = TaskEmbedding(3, 6)
    full = _router("task_conditioned", 5, 3, shared_embed=embed)
    state = full.extract_task_state(1)
    assert set(state) == {"gate.weight"}
    one_task = TaskEmbedding(1, 6)
    one_task.load_state_dict({**embed.state_dict(), "0.weight": embed.task_input_weight(1)})
    torch.testing.assert_close(one_task.embeddings()[0], embed.embeddings()[1], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Inference: the same numbers without grad mode, and one host read per layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("dispatch", STRATEGIES)
def test_an_eval_forward_is_the_same_under_no_grad_and_inference_mode(router, dispatch):
    """Without grad mode the experts run in place (GELU, gating): outputs and the routing record stay
    bit-identical to the grad-mode eval forward, for every router and strategy, idle experts included.
    (Per-expert alone differs in the last bits, as it did before: with grad mode it writes the first GEMM
    into the buffer of pre-activations kept for backward, ``addmm(out=...)``.)"""
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(4))
    for ids, task_ids in itertools.product([None, (0, 2, 3, 5)], [2, torch.tensor([0, 1])]):
        moe = _layer(router, dispatch, "eval", ids, None, False)
        want = moe(x, task_ids)
        want_routing = moe.last_routing
        for context in (torch.no_grad, torch.inference_mode):
            with context():
                got = moe(x, task_ids)
            if dispatch == "per_expert":
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(got, want), (context, ids, task_ids)
            for key in ("indices", "weights", "probs", "task_ids", "counts", "dropped"):
                got_value, want_value = moe.last_routing[key], want_routing[key]
                same = torch.equal(got_value, want_value) if torch.is_tensor(want_value) else got_value == want_value
                assert same, (context, key)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a device value on the host."""

    READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "_unique2", "equal"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dispatch", STRATEGIES)
def test_a_one_task_eval_forward_reads_the_device_only_for_the_queue_lengths(dispatch, monkeypatch):
    """The one host read of an eval forward with an ``int`` task is the plan's queue lengths (``tolist``):
    no ``bool``/``int``/``item`` of a device value (each a stream sync on a GPU), idle experts included."""
    tolist_calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or original(t))
    moe = _layer("multi_gate", dispatch, "eval", None, None, False)
    moe.w1.data[5] = float("nan")  # expert 5 is never picked below: it must stay unread
    with torch.no_grad():
        moe.router.weight[:, 5] = -1.0  # positive tokens: a logit of minus their sum, never in the top 2
        x = torch.rand(2, 9, 12, generator=torch.Generator().manual_seed(6)) + 1.0
        with torch.inference_mode(), _HostReads() as reads:
            out = moe(x, 1)
    assert reads.reads == [] and len(tolist_calls) == 1
    assert moe.last_routing["counts"][5] == 0 and torch.isfinite(out).all()
