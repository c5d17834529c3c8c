"""``torch.compile`` of MoE models: no graph break in routing or dispatch for inference, compiled outputs
equal eager within float tolerance, the dispatch op's fake implementation matches its real one."""

from __future__ import annotations

import os

import pytest
import torch

from m3vit.models import create_model
from m3vit.nn import MoE, compile_model, dispatch_to_experts
from m3vit.nn.compile import default_backend
from m3vit.nn.dispatch import moe_experts_op
from m3vit.utils.errors import InputError

TASKS = {"semseg": 5, "depth": 1, "sal": 1}


def _graph_breaks(module, *args) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(module)(*args).graph_break_count


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
@pytest.mark.parametrize("dispatch", ["per_expert", "batched"])
def test_the_moe_layer_traces_without_a_graph_break(router, dispatch):
    torch.manual_seed(0)
    moe = MoE(8, 6, 4, 2, num_tasks=3, router=router, dispatch=dispatch, capacity_factor=1.0).eval()
    x = torch.randn(2, 5, 8)
    assert _graph_breaks(moe, x, 1) == 0
    assert _graph_breaks(moe, x, torch.tensor([0, 2])) == 0


def _dispatch_inputs(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    tensors = (torch.randn(7, 4, generator=gen), torch.randint(0, 3, (7, 2), generator=gen),
               torch.rand(7, 2, generator=gen), torch.randn(3, 4, 5, generator=gen), torch.randn(3, 5, generator=gen),
               torch.randn(3, 5, 4, generator=gen), torch.randn(3, 4, generator=gen))
    return tuple(t.requires_grad_(requires_grad) if t.is_floating_point() else t for t in tensors)


@pytest.mark.parametrize("strategy", ["per_expert", "batched"])
@pytest.mark.parametrize("capacity", [None, 3])
def test_the_dispatch_op_passes_opcheck_and_equals_the_eager_dispatch(strategy, capacity):
    """Schema, fake implementation, autograd registration and AOT dispatch agree (``opcheck``); the op's
    output, queue counts and gradients are the eager dispatch's."""
    torch.library.opcheck(moe_experts_op, (*_dispatch_inputs(True), capacity, strategy))
    leaves = _dispatch_inputs(True)
    out, counts, dropped = moe_experts_op(*leaves, capacity, strategy)
    out.square().sum().backward()
    eager = _dispatch_inputs(True)
    want, plan = dispatch_to_experts(*eager, capacity, strategy)
    want.square().sum().backward()
    assert torch.equal(out, want)
    assert tuple(counts.tolist()) == plan.counts and int(dropped) == plan.dropped
    for got_leaf, want_leaf in zip(leaves, eager):
        if got_leaf.is_floating_point():
            torch.testing.assert_close(got_leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
@pytest.mark.parametrize("balance", ["vmoe", "reference"])
def test_compiled_training_has_no_graph_break_and_eager_gradients(router, balance):
    """Training compiles too (dispatch op with its backward, balance loss grouped per task without a
    host sync): output, aux loss and every gradient equal eager's within float tolerance."""
    torch.manual_seed(0)
    moe = MoE(8, 6, 4, 2, num_tasks=3, router=router, balance_loss=balance, renormalize=balance == "reference").train()
    x = torch.randn(3, 5, 8)
    task_ids = torch.tensor([0, 2, 0])
    assert _graph_breaks(moe, x, task_ids) == 0
    compiled = compile_model(moe, backend="aot_eager", fullgraph=True)
    results = []
    for forward in (compiled, moe):
        moe.zero_grad()
        leaf = x.clone().requires_grad_(True)
        out = forward(leaf, task_ids)
        aux = moe.aux_loss()
        (out.square().sum() + aux).backward()
        results.append([out.detach(), aux.detach(), leaf.grad] + [p.grad for p in moe.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _compiled_equals_eager(backend: str, task_sets) -> None:
    torch.manual_seed(0)
    model = create_model("m3vit_micro", TASKS, img_size=(32, 32)).eval()
    # fullgraph=True: any graph break anywhere in the model is an error.
    compiled = compile_model(model, backend=backend, fullgraph=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        for tasks in task_sets:
            want = model(images, tasks=tasks)
            want_counts = [layer.last_routing["counts"] for layer in model.moe_layers]
            got = compiled(images, tasks=tasks)
            assert list(got) == list(want)
            for task in want:
                torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-5)
            assert [layer.last_routing["counts"] for layer in model.moe_layers] == want_counts


def test_compiled_micro_model_equals_eager():
    """m3vit_micro compiles as one graph per task set, through AOT autograd (the dispatch op's fake
    implementation), and gives eager's predictions for one task and for all; ``last_routing`` is kept.
    (``aot_eager``: inductor's C++ build takes minutes here; the inductor test below is opt-in.)"""
    _compiled_equals_eager("aot_eager", (["depth"], None))


@pytest.mark.skipif(not os.environ.get("M3VIT_TEST_INDUCTOR"), reason="inductor builds C++ for minutes on CPU: "
                    "set M3VIT_TEST_INDUCTOR=1 to run")
def test_inductor_compiled_micro_model_equals_eager():
    _compiled_equals_eager(default_backend("cpu"), (["depth"], None))


def test_default_backend_needs_a_cxx_compiler_on_cpu(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert default_backend("cpu") == "aot_eager"
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert default_backend("cpu") == "inductor"


def test_an_unknown_backend_is_a_users_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="'nosuchbackend' is not a torch.compile backend: use inductor"):
        compile_model(model, backend="nosuchbackend")
