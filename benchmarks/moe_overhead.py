"""The fixed cost of one MoE layer at small shapes: aten ops and host syncs per forward, and its time
next to the dense MLP it replaces.

What it measures
----------------
For each size (``micro`` at 128x128: 65 tokens, width 96; ``tiny`` at 224x224: 197 tokens, width 192)
the first MoE layer of ``m3vit_<size>`` and the first dense ``Mlp`` of ``mvit_<size>`` (random weights,
five PASCAL-Context tasks, batch 1, one task) run in eval mode under ``torch.inference_mode()`` on the
same random tokens ``[1, N, D]``:

* **op counts** (deterministic): every aten op the dispatcher sees at the top level of one forward
  (a ``TorchDispatchMode``; composite ops such as ``linear`` count once), per dispatch strategy, with
  the **host syncs** among them: ops that read a device value on the host (``_local_scalar_dense``,
  ``is_nonzero``, ``item``, ``nonzero``, ``unique`` ...) plus ``Tensor.tolist`` calls (which bypass the
  dispatcher and are counted by wrapping it);
* **time** (busy-machine figures when other work shares the cores): the MoE layer and the MLP timed
  side by side, interleaved round by round (``torch.utils.benchmark.Timer.blocked_autorange``), medians
  and the median of the per-round ratios, with the load average before and after.

``--candidates`` also times, on the layer's own routing, the small-queue forms considered for the
expert compute (the shipped ``batched`` dispatch; its padded layout from a sort-free one-hot cumulative
count instead of the ``argsort`` plan; a combine that gathers each token's k rows and sums them with one
``bmm`` instead of the scatter-add; the pairs sorted by expert and two ``torch.nn.functional.grouped_mm``
calls, no padding and no host sync; every expert over every token, E/k times the FLOPs) and the two
planners alone, all next to the MLP.

``--in-model`` times every block's MLP (dense) or MoE layer *inside* a whole one-task forward of
``m3vit_<size>`` and ``mvit_<size>`` (wrapped ``forward`` methods, the two models alternating, medians),
with the backbone and the head: the layer's cost where its expert weights compete for cache with the
rest of the model, which the isolated timing above does not show.

Run: ``.venv/bin/python benchmarks/moe_overhead.py [--sizes micro tiny] [--strategies auto per_expert
batched] [--rounds 9] [--min-run-time 0.2] [--threads 2] [--no-timing] [--candidates] [--in-model] [--out
benchmarks/results/moe_overhead.json]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _env import loadavg
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

import m3vit
from m3vit.nn import MoE, dispatch_to_experts, plan_dispatch
from m3vit.nn.dispatch import STRATEGIES, choose_strategy
from m3vit.nn.layers import Mlp
from m3vit.utils.io import write_json

SIZES = {"micro": 128, "tiny": 224}
TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]
#: Ops that make the host wait for a device value (on CUDA: a stream synchronisation).
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "equal"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (by overload packet name) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_tolist():
    """Count ``Tensor.tolist`` calls (a host read the dispatcher does not see)."""
    calls = [0]
    original = torch.Tensor.tolist

    def tolist(self):
        calls[0] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        yield calls
    finally:
        torch.Tensor.tolist = original


def count_ops(fn) -> dict:
    """Ops and host syncs of one call of ``fn`` (after one warm-up call)."""
    fn()
    with count_tolist() as tolist_calls, OpCounter() as counter:
        fn()
    syncs = sum(n for name, n in counter.ops.items() if name in SYNC_OPS) + tolist_calls[0]
    return {"ops": sum(counter.ops.values()), "host_syncs": syncs, "tolist": tolist_calls[0],
            "by_op": dict(counter.ops.most_common())}


def layers(size: str):
    """``(moe, mlp, x)``: the first MoE layer of ``m3vit_<size>``, the first MLP of ``mvit_<size>``, tokens."""
    side = SIZES[size]
    torch.manual_seed(0)
    moe_model = m3vit.create_model(f"m3vit_{size}", TASKS, img_size=(side, side)).eval()
    dense_model = m3vit.create_model(f"mvit_{size}", TASKS, img_size=(side, side)).eval()
    moe = next(m for m in moe_model.modules() if isinstance(m, MoE))
    mlp = next(m for m in dense_model.modules() if isinstance(m, Mlp))
    tokens = (side // 16) ** 2 + 1
    x = torch.randn(1, tokens, moe.dim, generator=torch.Generator().manual_seed(1))
    return moe, mlp, x


def bench_size(size: str, strategies: list[str], rounds: int, min_run_time: float, timing: bool) -> dict:
    moe, mlp, x = layers(size)
    result = {"size": size, "img_size": SIZES[size], "tokens": x.shape[1], "dim": moe.dim,
              "experts": moe.num_experts, "top_k": moe.top_k, "strategies": {}}
    with torch.inference_mode():
        result["mlp"] = count_ops(lambda: mlp(x))
        fns = {"mlp": lambda: mlp(x)}
        for strategy in strategies:
            layer = copy.deepcopy(moe)
            layer.dispatch = strategy
            entry = count_ops(lambda layer=layer: layer(x, 0))
            if strategy == "auto":
                entry["auto_picks"] = choose_strategy(layer.route(x, 0).plan, moe.dim, moe.hidden_dim)
            result["strategies"][strategy] = entry
            fns[f"moe[{strategy}]"] = lambda layer=layer: layer(x, 0)
        if timing:
            times = {name: [] for name in fns}
            names = list(fns)
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]  # rotate the starting function
                for name in order:
                    timer = Timer("fn()", globals={"fn": fns[name]})
                    times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e6)
            result["median_us"] = {name: statistics.median(t) for name, t in times.items()}
            result["ratio_to_mlp"] = {name: statistics.median(a / b for a, b in zip(t, times["mlp"]))
                                      for name, t in times.items() if name != "mlp"}
            result["runs_us"] = times
    return result


# ---------------------------------------------------------------------------------------------
# Small-queue candidates (reference forms, timed by --candidates; the dispatch ships "batched")
# ---------------------------------------------------------------------------------------------


def onehot_layout(indices, num_experts):
    """Queue lengths (host) and every pair's 1-based place in its queue, choice-major, without a sort."""
    flat = indices.t().reshape(-1)
    running = (flat.unsqueeze(1) == torch.arange(num_experts)).cumsum(0)  # [S*k, E]
    return running[-1].tolist(), running.gather(1, flat.unsqueeze(1)).squeeze(1)


def batched_onehot_layout(x, indices, weights, w1, b1, w2, b2):
    """The batched dispatch (dropless, every expert busy) with its padded rows from ``onehot_layout``."""
    num_tokens, top_k = indices.shape
    counts, place = onehot_layout(indices, w1.shape[0])
    longest = max(counts)
    row = torch.add(place, indices.t().reshape(-1), alpha=longest).sub_(1)
    padded_token = torch.zeros(w1.shape[0] * longest, dtype=torch.long).index_put_(
        (row,), torch.arange(num_tokens).repeat(top_k))
    padded_gate = weights.new_zeros(w1.shape[0] * longest).index_put_((row,), weights.t().reshape(-1))
    xs = x.index_select(0, padded_token).view(w1.shape[0], longest, -1)
    h = torch.ops.aten.gelu_(torch.baddbmm(b1.unsqueeze(1), xs, w1))
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(-1, x.shape[1]).mul_(padded_gate.unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, padded_token, y)


def batched_gather_combine(x, indices, weights, w1, b1, w2, b2):
    """Padded experts as above, combined by gathering each token's k output rows and one ``bmm``."""
    num_tokens, top_k = indices.shape
    counts, place = onehot_layout(indices, w1.shape[0])
    longest = max(counts)
    row = torch.add(place.view(top_k, num_tokens).t(), indices, alpha=longest).sub_(1)  # [S, k]
    xs = x.new_zeros(w1.shape[0] * longest, x.shape[1]).index_put_((row,), x.unsqueeze(1))
    h = torch.ops.aten.gelu_(torch.baddbmm(b1.unsqueeze(1), xs.view(w1.shape[0], longest, -1), w1))
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(-1, x.shape[1])
    return torch.bmm(weights.unsqueeze(1), y[row]).squeeze(1)


def grouped(x, indices, weights, w1, b1, w2, b2):
    """The pairs sorted by expert (choice-major, as the plan), two ``F.grouped_mm`` over the jagged queues
    (offsets on the device: no host sync, no padding), biases gathered per row, scatter-add combine."""
    num_tokens, _ = indices.shape
    flat = indices.t().reshape(-1)
    slot = torch.argsort(flat, stable=True)
    counts = torch.zeros(w1.shape[0], dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    expert, token = flat.index_select(0, slot), slot.remainder(num_tokens)
    h = F.grouped_mm(x.index_select(0, token), w1, offs=offs).add_(b1.index_select(0, expert))
    y = F.grouped_mm(torch.ops.aten.gelu_(h), w2, offs=offs).add_(b2.index_select(0, expert))
    y.mul_(weights.t().reshape(-1).index_select(0, slot).unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, token, y)


def all_experts(x, indices, weights, w1, b1, w2, b2):
    """Every expert over every token (one wide first GEMM, one bmm), combined with the dense gate matrix."""
    num_experts, dim, hidden = w1.shape
    h = torch.nn.functional.gelu(torch.addmm(b1.reshape(-1), x, w1.permute(1, 0, 2).reshape(dim, -1)))
    y = torch.baddbmm(b2.unsqueeze(1), h.view(-1, num_experts, hidden).transpose(0, 1), w2)  # [E, S, D]
    gates = weights.new_zeros(x.shape[0], num_experts).scatter_(1, indices, weights)
    return torch.einsum("se,esd->sd", gates, y)


def bench_candidates(size: str, rounds: int, min_run_time: float) -> dict:
    """Time the small-queue forms on the layer's routing; check each against the shipped dispatch."""
    moe, mlp, x = layers(size)
    with torch.inference_mode():
        routing = moe.route(x, 0)
        args = (x[0], routing.indices, routing.weights, moe.w1, moe.b1, moe.w2, moe.b2)
        shipped = dispatch_to_experts(*args, strategy="batched")[0]
        forms = {"batched (shipped)": lambda: dispatch_to_experts(*args, strategy="batched"),
                 "batched, one-hot layout": lambda: batched_onehot_layout(*args),
                 "batched, gather + bmm combine": lambda: batched_gather_combine(*args),
                 "grouped_mm, sorted, no padding": lambda: grouped(*args),
                 "all experts, every token": lambda: all_experts(*args)}
        max_error = {name: float((form() if name != "batched (shipped)" else shipped).sub(shipped).abs().max())
                     for name, form in forms.items()}
        fns = {"mlp": lambda: mlp(x), **forms,
               "planner: argsort plan": lambda: plan_dispatch(routing.indices, moe.num_experts),
               "planner: one-hot layout": lambda: onehot_layout(routing.indices, moe.num_experts)}
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                timer = Timer("fn()", globals={"fn": fns[name]})
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e6)
    return {"size": size, "median_us": {n: statistics.median(t) for n, t in times.items()},
            "max_abs_error_vs_shipped": max_error, "runs_us": times}


def bench_in_model(size: str, rounds: int) -> dict:
    """Per block, the MLP / MoE layer's time inside whole one-task forwards of both models (medians, µs)."""
    models = {}
    for kind in ("m3vit", "mvit"):
        torch.manual_seed(0)
        models[kind] = m3vit.create_model(f"{kind}_{size}", TASKS, img_size=(SIZES[size],) * 2).eval()
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)

    def timed(key, module):
        forward = module.forward

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            times[key].append((time.perf_counter() - start) * 1e6)
            return out
        module.forward = wrapper

    for kind, model in models.items():
        for i, block in enumerate(model.backbone.blocks):
            timed((kind, f"block {i}"), block.mlp)
        timed((kind, "backbone"), model.backbone)
        timed((kind, "head"), model.heads[TASKS[0]])
        timed((kind, "model"), model)
    images = torch.randn(1, 3, SIZES[size], SIZES[size])
    warmup = 3
    with torch.inference_mode():
        for r in range(rounds + warmup):
            for kind in (("m3vit", "mvit") if r % 2 else ("mvit", "m3vit")):
                models[kind](images, tasks=TASKS[:1])
    medians = {kind: {part: statistics.median(t[warmup:]) for (k, part), t in times.items() if k == kind}
               for kind in models}
    moe_blocks = [f"block {i}" for i, block in enumerate(models["m3vit"].backbone.blocks) if block.is_moe]
    return {"size": size, "rounds": rounds, "median_us": medians, "m3vit_moe_blocks": moe_blocks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked_autorange measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true", help="op counts only (deterministic)")
    ap.add_argument("--candidates", action="store_true", help="also time the small-queue candidate forms")
    ap.add_argument("--in-model", action="store_true", help="also time each MLP / MoE layer inside whole forwards")
    ap.add_argument("--out", default="benchmarks/results/moe_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    results = [bench_size(size, args.strategies, args.rounds, args.min_run_time, not args.no_timing)
               for size in args.sizes]
    candidates = ([bench_candidates(size, args.rounds, args.min_run_time) for size in args.sizes]
                  if args.candidates else [])
    in_model = [bench_in_model(size, max(args.rounds, 30)) for size in args.sizes] if args.in_model else []
    load_after = loadavg()
    print(f"# one MoE layer vs the dense MLP, batch 1, eval, inference_mode, {args.threads} threads, "
          f"torch {torch.__version__}; load {load_before} -> {load_after}")
    print("\n| size | layer | aten ops | host syncs | median us | / MLP |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        rows = [("mlp", r["mlp"])] + [(f"moe[{s}]", e) for s, e in r["strategies"].items()]
        for name, entry in rows:
            median = r.get("median_us", {}).get(name)
            ratio = r.get("ratio_to_mlp", {}).get(name)
            label = name + (f" -> {entry['auto_picks']}" if "auto_picks" in entry else "")
            print(f"| {r['size']} | {label} | {entry['ops']} | {entry['host_syncs']} | "
                  f"{'' if median is None else f'{median:.1f}'} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    for r in results:
        for s, e in r["strategies"].items():
            print(f"{r['size']} moe[{s}] ops: {e['by_op']}")
    if candidates:
        print("\n| size | candidate | median us | max abs diff vs shipped |\n|---|---|---:|---:|")
        for c in candidates:
            for name, median in c["median_us"].items():
                error = c["max_abs_error_vs_shipped"].get(name)
                print(f"| {c['size']} | {name} | {median:.1f} | {'' if error is None else f'{error:.1e}'} |")
    for m in in_model:
        m3, mv = m["median_us"]["m3vit"], m["median_us"]["mvit"]
        print(f"\n| {m['size']}: part (in a whole forward) | m3vit us | mvit us | difference us |\n|---|---:|---:|---:|")
        for part in m3:
            label = f"{part} (MoE)" if part in m["m3vit_moe_blocks"] else part
            print(f"| {label} | {m3[part]:.0f} | {mv[part]:.0f} | {m3[part] - mv[part]:+.0f} |")
    write_json(args.out, {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
                          "torch": torch.__version__, "threads": args.threads, "loadavg_before": load_before,
                          "loadavg_after": load_after, "results": results,
                          "candidates": candidates, "in_model": in_model})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
