"""Distributed smoke for ``benchmarks/gpu.sh``: one process group, an all-reduce and DDP training steps.

``m3vit train`` joins a process group only when ``WORLD_SIZE`` > 1, so a 1-process ``torchrun`` of the
trainer never touches NCCL. This script does, under ``torchrun --standalone --nproc_per_node=N``:
joins the group (``--backend nccl`` on CUDA, ``gloo`` on CPU), checks an all-reduce of each rank's
``rank + 1`` against ``N (N + 1) / 2``, then runs ``--steps`` DDP training steps of a small
``m3vit_micro`` (two tasks, MoE; ``find_unused_parameters`` since a batch routes to some experts
only) with ``--amp`` autocast, and checks that the loss and every gradient are finite. Rank 0 writes
the result as JSON to ``--out``.

Run: ``torchrun --standalone --nproc_per_node=1 benchmarks/gpu_smoke.py [--backend nccl|gloo]
[--device cuda|cpu] [--amp none|bf16|fp16] [--steps 3] [--out benchmarks/results/gpu_smoke.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import m3vit
from m3vit.utils.io import write_json

TASKS = {"semseg": 5, "depth": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/gpu_smoke.json")
    args = ap.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        ap.error("run me under torchrun, e.g. torchrun --standalone --nproc_per_node=1 benchmarks/gpu_smoke.py")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if args.amp == "fp16" and args.device != "cuda":
        ap.error("--amp fp16 needs --device cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    start = time.perf_counter()
    dist.init_process_group(backend=args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        all_reduce_ok = float(value) == world * (world + 1) / 2

        torch.manual_seed(0)
        side = args.img_size
        model = m3vit.create_model("m3vit_micro", TASKS, img_size=(side, side)).to(device).train()
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
        gen = torch.Generator().manual_seed(rank)
        losses, finite_grads = [], True
        for _ in range(args.steps):
            images = torch.randn(2, 3, side, side, generator=gen).to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                                enabled=args.amp != "none"):
                outs = ddp(images)
                loss = sum(o.float().pow(2).mean() for o in outs.values()) + model.aux_loss().float()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            finite_grads &= all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result = {"backend": dist.get_backend(), "world_size": world, "device": str(device), "amp": args.amp,
                  "torch": torch.__version__, "all_reduce_ok": all_reduce_ok, "steps": args.steps, "losses": losses,
                  "finite_loss": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
                  "finite_grads": finite_grads, "seconds": time.perf_counter() - start,
                  "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        ok = result["all_reduce_ok"] and result["finite_loss"] and result["finite_grads"]
        result["ok"] = ok
        if rank == 0:
            write_json(args.out, result)
            print(f"{'OK' if ok else 'FAILED'}: {args.backend} group of {world}, all-reduce "
                  f"{'ok' if all_reduce_ok else 'WRONG'}, {args.steps} DDP steps of m3vit_micro ({args.amp}) on "
                  f"{device}, losses {', '.join(f'{v:.4g}' for v in losses)}; wrote {args.out}")
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
