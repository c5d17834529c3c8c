"""m3vit serve through its real HTTP stack: requests per second for one task, and what switching tasks costs.

What it measures
----------------
Each setting is a random-weight model with the six tasks (semseg, human_parts, sal, normals, edge,
depth), saved to a temporary checkpoint and served by ``m3vit.serve.create_app`` under uvicorn in a
thread of this process (``m3vit.serve.running_server``, a real socket on 127.0.0.1):

* ``micro128``  ``m3vit_micro`` (96 wide, 6 blocks, MoE in 1,3,5, 16 experts top-4) at 128x128;
* ``small512``  ``m3vit_small`` (ViT-S: 384 wide, 12 blocks, MoE in 1,3,...,11, 16 experts top-4) at 512x512.

The uploaded image is a PNG of the model's input size (so no resize), sent as multipart by
``http.client`` over keep-alive connections.

Throughput (resident experts): ``--clients`` threads each POST one task (``--task``, default semseg)
in a loop for ``--seconds`` after ``--warmup`` untimed requests; requests/s = answered requests / wall
time. The server runs one model replica (``--workers``, default 1; model calls are serialised), so
extra clients measure queueing plus the overlap of decoding/encoding with the model call. Reported
with the median client latency (HTTP round trip: upload, decode, pathway, PNG encode, JSON) and the
median server-side pathway latency (``ms``: the ``model(images, tasks=[t])`` call alone).

Task switch: for each mode, ``resident`` and ``streaming`` (``--stream-experts``: experts read from
the checkpoint file, two buffers per MoE layer), both servers running side by side, one client sends
per round the sequences (A, B) and (B, B) and records the second request's task-B pathway latency:
"B after A" against "B after B". Rounds interleave the modes and alternate which sequence goes
first; ``--repeats`` rounds, medians reported, with the ratio (after A / after B; 1.0 = switching is
free), the experts B's request read from the file (streaming) and the server's ``model_loads``
before and after (a reload would change it).

Caveats: client and server share this machine's cores (the client's PNG building is done once up
front; its HTTP work is small next to the model). Timings on a loaded machine are noise: run it
on an idle one. The checkpoint was just written, so streaming reads come from the page cache.

Run: ``.venv/bin/python benchmarks/serve.py [--settings micro128 small512] [--task semseg]
[--switch semseg depth] [--clients 4] [--seconds 10] [--repeats 15] [--threads N] [--quick]
[--out benchmarks/results/serve.json]``. ``--quick`` is a smoke run (micro at 64x64, 4 experts,
a second of throughput, 3 rounds).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from _env import machine_info
from PIL import Image

import m3vit
from m3vit.utils.io import write_json
from m3vit.serve import create_app, running_server

TASKS = ["semseg", "human_parts", "sal", "normals", "edge", "depth"]
SETTINGS = {
    "micro128": {"model": "m3vit_micro", "img_size": (128, 128), "overrides": {}},
    "small512": {"model": "m3vit_small", "img_size": (512, 512), "overrides": {}},
    "quick64": {"model": "m3vit_micro", "img_size": (64, 64), "overrides": {"num_experts": 4, "top_k": 2}},
}
BOUNDARY = "m3vit-benchmark-boundary"


def multipart(image_png: bytes, tasks: str) -> bytes:
    """A multipart/form-data body with the image in field ``image`` and ``tasks``."""
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="tasks"\r\n\r\n{tasks}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="bench.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image_png + f"\r\n--{BOUNDARY}--\r\n".encode()


class Client:
    """One keep-alive HTTP connection to a server."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)

    def get(self, path: str) -> dict:
        try:
            self.conn.request("GET", path)
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.conn.close()  # the server closed the idle keep-alive connection: reopen once
            self.conn.request("GET", path)
            resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body)

    def predict(self, body: bytes) -> tuple[dict, float]:
        """The answer and the client's wall time in ms (a keep-alive connection the server closed while idle
        is reopened once, outside the timing)."""
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        start = time.perf_counter()
        try:
            self.conn.request("POST", "/api/predict", body=body, headers=headers)
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.conn.close()
            start = time.perf_counter()
            self.conn.request("POST", "/api/predict", body=body, headers=headers)
            resp = self.conn.getresponse()
        data = resp.read()
        ms = (time.perf_counter() - start) * 1e3
        if resp.status != 200:
            raise RuntimeError(f"POST /api/predict: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data), ms

    def close(self) -> None:
        self.conn.close()


def make_checkpoint(setting: dict, directory: Path) -> Path:
    torch.manual_seed(0)
    model = m3vit.create_model(setting["model"], TASKS, img_size=setting["img_size"], **setting["overrides"])
    return m3vit.save_checkpoint(model, directory)


def make_image(size: tuple[int, int]) -> bytes:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(h + w - 2, 1)], -1)
    rgb[h // 4:h // 2, w // 3:2 * w // 3] = (230, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def measure_throughput(url: str, body: bytes, task: str, clients: int, seconds: float, warmup: int) -> dict:
    warm = Client(url)
    for _ in range(warmup):
        warm.predict(body)
    warm.close()
    wall_ms, pathway_ms, errors = [], [], []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients + 1)

    def run() -> None:
        client = Client(url)
        barrier.wait()
        try:
            while time.perf_counter() < stop:
                answer, ms = client.predict(body)
                with lock:
                    wall_ms.append(ms)
                    pathway_ms.append(answer["tasks"][task]["ms"])
        except Exception as exc:  # noqa: BLE001 - reported in the results
            errors.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"task": task, "clients": clients, "seconds": elapsed, "requests": len(wall_ms),
            "requests_per_s": len(wall_ms) / elapsed, "client_ms_median": _median(wall_ms),
            "pathway_ms_median": _median(pathway_ms), "errors": errors}


def measure_task_switch(urls: dict[str, str], image: bytes, task_a: str, task_b: str, repeats: int,
                        warmup: int) -> dict:
    body_a, body_b = multipart(image, task_a), multipart(image, task_b)
    clients = {mode: Client(url) for mode, url in urls.items()}
    loads_before = {mode: c.get("/api/info")["model_loads"] for mode, c in clients.items()}
    for client in clients.values():
        for _ in range(warmup):
            client.predict(body_a)
            client.predict(body_b)
    samples = {mode: {"after_a": [], "after_b": [], "after_a_client": [], "after_b_client": [],
                      "read_after_a": [], "read_after_b": []} for mode in urls}
    for round_index in range(repeats):
        modes = list(clients) if round_index % 2 == 0 else list(clients)[::-1]
        for mode in modes:
            client, rec = clients[mode], samples[mode]
            sequences = [("after_a", body_a), ("after_b", body_b)]
            if round_index % 2:
                sequences.reverse()
            for name, first in sequences:
                client.predict(first)
                answer, ms = client.predict(body_b)
                entry = answer["tasks"][task_b]
                rec[name].append(entry["ms"])
                rec[f"{name}_client"].append(ms)
                rec[f"read_{name}"].append(entry["experts_read"])
    out = []
    for mode, client in clients.items():
        rec = samples[mode]
        loads_after = client.get("/api/info")["model_loads"]
        after_a, after_b = _median(rec["after_a"]), _median(rec["after_b"])
        out.append({
            "mode": mode, "task_a": task_a, "task_b": task_b, "repeats": repeats,
            "b_after_a_ms_median": after_a, "b_after_b_ms_median": after_b,
            "switch_ratio": after_a / after_b, "switch_cost_ms": after_a - after_b,
            "b_after_a_client_ms_median": _median(rec["after_a_client"]),
            "b_after_b_client_ms_median": _median(rec["after_b_client"]),
            "b_experts_read_after_a_median": _median(rec["read_after_a"]),
            "b_experts_read_after_b_median": _median(rec["read_after_b"]),
            "model_loads_before": loads_before[mode], "model_loads_after": loads_after,
            "samples_ms": {"b_after_a": rec["after_a"], "b_after_b": rec["after_b"]},
        })
        client.close()
    return out


def _median(values):
    return statistics.median(values) if values else None


def bench_setting(name: str, args, workdir: Path) -> dict:
    setting = SETTINGS[name]
    checkpoint = make_checkpoint(setting, workdir / name)
    image = make_image(setting["img_size"])
    h, w = setting["img_size"]
    print(f"## {name}: {setting['model']} at {h}x{w}", flush=True)
    result = {"setting": name, "model": setting["model"], "img_size": [h, w], "overrides": setting["overrides"]}
    options = dict(device=args.device, workers=args.workers, queue_size=max(args.clients, 1) + 4)
    resident = create_app(checkpoint, **options)
    streaming = create_app(checkpoint, stream_experts=True, **options)
    with running_server(resident) as resident_url, running_server(streaming) as streaming_url:
        tp = measure_throughput(resident_url, multipart(image, args.task), args.task, args.clients, args.seconds,
                                args.warmup)
        tp.update(mode="resident", workers=args.workers)
        probe = Client(resident_url)
        tp["memory_mb"] = probe.get("/api/info")["memory_mb"]
        probe.close()
        result["throughput"] = tp
        print(f"  {args.task}: {tp['requests_per_s']:.2f} requests/s with {args.clients} clients "
              f"(client median {tp['client_ms_median']:.1f} ms, pathway median {tp['pathway_ms_median']:.1f} ms)",
              flush=True)
        switch = measure_task_switch({"resident": resident_url, "streaming": streaming_url}, image,
                                     args.switch[0], args.switch[1], args.repeats, args.warmup)
        result["task_switch"] = switch
        for row in switch:
            print(f"  {row['mode']}: {row['task_b']} after {row['task_a']} {row['b_after_a_ms_median']:.1f} ms vs "
                  f"after {row['task_b']} {row['b_after_b_ms_median']:.1f} ms (ratio {row['switch_ratio']:.3f}; "
                  f"model loads {row['model_loads_before']} -> {row['model_loads_after']})", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=None,
                    help="default: micro128 small512 (quick: quick64)")
    ap.add_argument("--task", default="semseg", choices=TASKS, help="the task of the throughput run")
    ap.add_argument("--switch", nargs=2, default=["semseg", "depth"], metavar=("A", "B"),
                    help="task-switch pair: B's latency after A vs after B (default semseg depth)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads of the throughput run")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds of the throughput run (default 10)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved task-switch rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    ap.add_argument("--workers", type=int, default=1, help="model replicas of the server")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: micro at 64x64 with 4 experts, ~1 s each")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args(argv)
    for task in args.switch:
        if task not in TASKS:
            ap.error(f"--switch: unknown task {task!r}; choose from {TASKS}")
    if args.clients < 1 or args.workers < 1:
        ap.error("--clients and --workers must be >= 1")
    args.settings = args.settings or (["quick64"] if args.quick else ["micro128", "small512"])
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    args.repeats = args.repeats or (3 if args.quick else 15)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    print(f"# m3vit serve benchmark  torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']}",
          flush=True)
    results = {"benchmark": "serve", "machine": info, "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
               "args": vars(args), "settings": []}
    with tempfile.TemporaryDirectory(prefix="m3vit-bench-serve-") as tmp:
        for name in args.settings:
            results["settings"].append(bench_setting(name, args, Path(tmp)))
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
