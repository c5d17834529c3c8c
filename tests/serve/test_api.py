"""The HTTP API of ``m3vit serve`` through the ASGI test client: every endpoint, every error, concurrency, streaming."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install m3vit[serve])")
from fastapi.testclient import TestClient  # noqa: E402

from m3vit.engine.builders import build_tasks  # noqa: E402
from m3vit.engine.inference import predict as predict_batch  # noqa: E402
from m3vit.models import load_checkpoint  # noqa: E402
from m3vit.serve import create_app, running_server  # noqa: E402
from m3vit.utils.errors import InputError  # noqa: E402

def predict(model, image, tasks):
    """One image's raw outputs at its own size, ``{task: [C, H, W]}`` (``m3vit.engine.inference.predict``)."""
    return {t: p[0] for t, p in predict_batch(model, [image], tasks, out_size=image.shape[-2:]).items()}


TOKENS = 1 + (64 // 16) ** 2  # class token + 4x4 patches of the 64x64 input
TOP_K, EXPERTS, BLOCKS = 2, 4, [1, 3, 5]


@pytest.fixture
def make_client(checkpoint):
    """``make_client(**create_app options)`` -> a started TestClient; every app is shut down afterwards."""
    opened = []

    def make(model_or_checkpoint=None, raise_server_exceptions=True, **options):
        app = create_app(checkpoint if model_or_checkpoint is None else model_or_checkpoint,
                         **({"device": "cpu"} if model_or_checkpoint is None else {}), **options)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def post(client, data: bytes | None, filename="x.png", **fields):
    files = {"image": (filename, data, "image/png")} if data is not None else None
    return client.post("/api/predict", files=files, data=fields or None)


def png_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def npy_array(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def assert_serving(client, to_png, make_image):
    """The server still answers after whatever came before."""
    assert client.get("/api/health").json() == {"status": "ok"}
    answer = post(client, to_png(make_image(16, 16, seed=9)), tasks="sal")
    assert answer.status_code == 200, answer.text


def assert_error(answer, status: int, *words: str):
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    message = body["error"]
    assert message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------------------------------
# Endpoints
# ------------------------------------------------------------------------------------------------
def test_health(client):
    answer = client.get("/api/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_info_describes_the_model(client, serve_tasks):
    info = client.get("/api/info").json()
    assert info["model"] == "m3vit_micro"
    assert info["tasks"] == serve_tasks
    assert info["num_experts"] == EXPERTS and info["top_k"] == TOP_K
    assert info["moe_blocks"] == BLOCKS
    assert info["streaming"] is False
    assert info["input_size"] == [64, 64] and info["device"] == "cpu"
    assert info["workers"] == 1 and info["model_loads"] == 1
    assert info["memory_mb"] > 0 and info["memory"]["expert_weights_mb"] > 0


def test_page_and_its_files_are_served_without_external_urls(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<input type="file"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        answer = client.get(f"/static/{name}")
        assert answer.status_code == 200 and kind in answer.headers["content-type"]
        assert "http://" not in answer.text and "https://" not in answer.text  # works offline: no CDN
    assert "http://" not in page.text and "https://" not in page.text


def test_predict_every_task_by_default(client, checkpoint, to_png, make_image, serve_tasks):
    array = make_image(40, 56, seed=1)  # not the model's 64x64, not square
    answer = post(client, to_png(array))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert list(body["tasks"]) == serve_tasks and list(body["experts"]) == serve_tasks
    assert body["image_size"] == [40, 56] and body["model_loads"] == 1
    assert body["memory_mb"] > 0
    model = load_checkpoint(checkpoint)
    task_objects = build_tasks(dict(model.config.tasks))
    image = as_tensor(array)
    for task in serve_tasks:
        entry = body["tasks"][task]
        assert entry["ms"] > 0 and entry["experts_read"] == 0 and "npy" not in entry
        shown = png_array(entry["png"])
        assert shown.shape == (40, 56, 3)  # the map at the uploaded image's size
        expected = task_objects[task].colorize(predict(model, image, [task])[task], kind="pred")
        np.testing.assert_array_equal(shown, expected)


def test_experts_are_this_images_routing_per_block(client, checkpoint, to_png, make_image):
    array = make_image(64, 64, seed=2)
    body = post(client, to_png(array), tasks="semseg,depth").json()
    model = load_checkpoint(checkpoint)
    for task in ("semseg", "depth"):
        blocks = body["experts"][task]
        assert [b["block"] for b in blocks] == BLOCKS
        predict(model, as_tensor(array), [task])  # this task alone, as the server runs it
        for block, layer in zip(blocks, model.moe_layers):
            assert len(block["counts"]) == EXPERTS and sum(block["counts"]) == TOKENS * TOP_K
            expected = np.bincount(layer.last_routing["indices"].reshape(-1).numpy(), minlength=EXPERTS)
            assert block["counts"] == expected.tolist()
    assert body["experts"]["semseg"] != body["experts"]["depth"]  # task routers pick different pathways


def test_predict_a_subset_with_raw_values(client, checkpoint, to_png, make_image):
    array = make_image(30, 20, seed=3)
    answer = post(client, to_png(array), tasks=" depth , semseg,normals ", raw="true")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert list(body["tasks"]) == ["depth", "semseg", "normals"]
    model = load_checkpoint(checkpoint)
    task_objects = build_tasks(dict(model.config.tasks))
    for task, entry in body["tasks"].items():
        values = npy_array(entry["npy"])
        expected = task_objects[task].decode(predict(model, as_tensor(array), [task])[task])
        assert values.dtype == expected.dtype and values.shape == expected.shape
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert npy_array(body["tasks"]["normals"]["npy"]).shape == (3, 30, 20)
    assert npy_array(body["tasks"]["semseg"]["npy"]).dtype == np.uint8


def test_repeated_tasks_fields_and_a_jpeg(client, to_png, make_image):
    answer = client.post("/api/predict", files={"image": ("x.jpg", to_png(make_image(24, 24), "JPEG"), "image/jpeg")},
                         data={"tasks": ["edge", "sal"]})
    assert answer.status_code == 200, answer.text
    assert list(answer.json()["tasks"]) == ["edge", "sal"]


# ------------------------------------------------------------------------------------------------
# Errors: one line of JSON, a 4xx, and the server keeps serving
# ------------------------------------------------------------------------------------------------
def test_not_an_image_is_400(client, to_png, make_image):
    assert_error(post(client, b"this is plain text, not a picture", filename="notes.txt"), 400, "not an image")
    assert_error(post(client, to_png(make_image(32, 32))[:60]), 400, "image")  # truncated PNG
    assert_error(post(client, b""), 400, "empty")
    assert_serving(client, to_png, make_image)


def test_unknown_task_is_400_and_lists_the_models_tasks(client, to_png, make_image, serve_tasks):
    message = assert_error(post(client, to_png(make_image(16, 16)), tasks="semseg,segmentation"), 400,
                           "segmentation", *serve_tasks)
    assert "tasks" in message
    assert_serving(client, to_png, make_image)


@pytest.mark.parametrize("request_kwargs, words", [
    ({"data": {"tasks": "sal"}}, ["multipart"]),                                      # a form without a file
    ({"json": {"image": "abc"}}, ["multipart"]),                                      # JSON
    ({"files": {"picture": ("x.png", b"abc", "image/png")}}, ["'image'"]),            # wrong field name
    ({"files": {"image": (None, "not a file")}}, ["file upload"]),                    # a text field
    ({"files": {"image": ("x.png", b"abc", "image/png")}, "data": {"raw": "maybe"}}, ["raw"]),
])
def test_malformed_requests_are_400(client, to_png, make_image, request_kwargs, words):
    assert_error(client.post("/api/predict", **request_kwargs), 400, *words)
    assert_serving(client, to_png, make_image)


def test_unknown_route_and_method_are_json(client, to_png, make_image):
    assert_error(client.get("/api/nothing"), 404, "/api/nothing")
    assert_error(client.get("/api/predict"), 405, "POST")
    assert_serving(client, to_png, make_image)


def test_upload_over_the_limit_is_413(make_client, to_png, make_image):
    client = make_client(max_upload_mb=0.001)  # 1048 bytes
    big = to_png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert len(big) > 2000
    assert_error(post(client, big), 413, "--max-upload-mb")
    # Without a Content-Length (chunked upload), the limit holds while the body arrives.
    boundary = "m3vit-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
    chunks = (body[i:i + 256] for i in range(0, len(body), 256))
    answer = client.post("/api/predict", content=chunks,
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert_error(answer, 413, "--max-upload-mb")
    small = to_png(np.full((8, 8, 3), 100, np.uint8))
    assert len(small) < 1000
    assert post(client, small, tasks="sal").status_code == 200


def test_too_many_pixels_is_413(make_client, to_png, make_image):
    client = make_client(max_pixels=500)
    assert_error(post(client, to_png(make_image(20, 30))), 413, "30x20", "600", "--max-pixels")
    assert post(client, to_png(make_image(20, 25)), tasks="sal").status_code == 200  # exactly 500


def test_a_server_bug_is_500_with_a_logged_traceback_not_a_4xx(make_client, to_png, make_image, caplog):
    client = make_client(raise_server_exceptions=False)
    service = client.app.state.service

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in encoding")

    service.encode = broken
    with caplog.at_level(logging.ERROR, logger="m3vit.serve.app"):
        message = assert_error(post(client, to_png(make_image(16, 16)), tasks="sal"), 500, "RuntimeError", "bug")
    assert "a bug in encoding" not in message  # internals stay in the log
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert logged, "the traceback must be logged"
    assert client.get("/api/health").status_code == 200

    strict = make_client()  # and the bug surfaces to the ASGI server (tests, uvicorn's log)
    strict.app.state.service.encode = broken
    with pytest.raises(RuntimeError, match="a bug in encoding"):
        post(strict, to_png(make_image(16, 16)), tasks="sal")


# ------------------------------------------------------------------------------------------------
# Concurrency
# ------------------------------------------------------------------------------------------------
def _concurrent_posts(url_or_client, requests, post_fn):
    results: dict[int, object] = {}
    errors = []

    def run(i, data, tasks):
        try:
            results[i] = post_fn(url_or_client, data, tasks)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, data, tasks)) for i, (data, tasks) in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("workers", [1, 2])
def test_many_requests_at_once_are_answered_correctly(make_client, checkpoint, to_png, make_image, workers):
    client = make_client(workers=workers, queue_size=16)
    assert client.get("/api/info").json()["model_loads"] == workers
    task_cycle = ["sal", "depth", "sal,depth", "depth,sal"]
    arrays = [make_image(16 + 4 * i, 20, seed=10 + i) for i in range(12)]
    requests = [(to_png(a), task_cycle[i % 4]) for i, a in enumerate(arrays)]
    results = _concurrent_posts(client, requests, lambda c, data, tasks: post(c, data, tasks=tasks, raw="true"))
    model = load_checkpoint(checkpoint)
    task_objects = build_tasks(dict(model.config.tasks))
    for i, array in enumerate(arrays):
        answer = results[i]
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert list(body["tasks"]) == task_cycle[i % 4].split(",")
        for task, entry in body["tasks"].items():
            expected = task_objects[task].decode(predict(model, as_tensor(array), [task])[task])
            np.testing.assert_allclose(npy_array(entry["npy"]), expected, rtol=1e-5, atol=1e-6)
    assert client.get("/api/info").json()["requests_served"] == 12
    assert client.app.state.service.in_flight == 0


def test_a_full_queue_is_503_and_the_server_recovers(make_client, checkpoint, to_png, make_image):
    model = load_checkpoint(checkpoint)
    started, release = threading.Event(), threading.Event()

    def hold(module, args):  # the first model call blocks until released
        started.set()
        assert release.wait(30)

    model.register_forward_pre_hook(hold)
    client = make_client(model, workers=1, queue_size=1)
    service = client.app.state.service
    data = to_png(make_image(16, 16))
    answers = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", post(client, data, tasks="sal")))
    second = threading.Thread(target=lambda: answers.setdefault("second", post(client, data, tasks="sal")))
    try:
        first.start()
        assert started.wait(30)          # the worker is busy with the first request
        second.start()
        deadline = time.monotonic() + 30
        while service.in_flight < 2:     # the second one waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = post(client, data, tasks="sal")
        assert_error(busy, 503, "busy", "--queue-size")
        assert busy.headers["retry-after"] == "1"
        assert client.get("/api/health").status_code == 200  # health never queues
    finally:
        release.set()
        first.join(30)
        second.join(30)
    assert answers["first"].status_code == 200 and answers["second"].status_code == 200
    assert post(client, data, tasks="sal").status_code == 200


def test_a_real_server_answers_concurrent_clients(checkpoint, to_png, make_image):
    import httpx2

    app = create_app(checkpoint, device="cpu", queue_size=16)
    arrays = [make_image(20, 20, seed=30 + i) for i in range(6)]

    def send(url, data, tasks):
        with httpx2.Client(base_url=url, timeout=60) as http:
            return http.post("api/predict", files={"image": ("x.png", data, "image/png")},
                             data={"tasks": tasks, "raw": "true"})

    with running_server(app) as url:
        assert url.startswith("http://127.0.0.1:")
        results = _concurrent_posts(url, [(to_png(a), "sal") for a in arrays], send)
    model = load_checkpoint(checkpoint)
    task = build_tasks(dict(model.config.tasks))["sal"]
    for i, array in enumerate(arrays):  # each answer is its own image's map
        assert results[i].status_code == 200, results[i].text
        expected = task.decode(predict(model, as_tensor(array), ["sal"])["sal"])
        np.testing.assert_allclose(npy_array(results[i].json()["tasks"]["sal"]["npy"]), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Streaming and task switching
# ------------------------------------------------------------------------------------------------
def test_streaming_mode_predicts_the_same_and_reads_only_the_tasks_experts(make_client, to_png, make_image):
    resident = make_client()
    streaming = make_client(stream_experts=True)
    info = streaming.get("/api/info").json()
    assert info["streaming"] is True and info["memory"]["expert_weights_mb"] == 0
    assert info["memory"]["stream_buffers_mb"] > 0
    data = to_png(make_image(48, 40, seed=4))
    for task_a, task_b in (("semseg", "depth"), ("depth", "semseg"), ("normals", "normals")):
        post(streaming, data, tasks=task_a)  # task A just before task B
        body = post(streaming, data, tasks=task_b, raw="true").json()
        entry = body["tasks"][task_b]
        busy = sum(sum(1 for c in block["counts"] if c) for block in body["experts"][task_b])
        assert entry["experts_read"] == busy  # B's pathway reads B's experts, nothing of A's
        assert entry["bytes_read"] > 0
        assert body["model_loads"] == 1  # nothing reloaded by the switch
        reference = post(resident, data, tasks=task_b, raw="true").json()
        np.testing.assert_allclose(npy_array(entry["npy"]), npy_array(reference["tasks"][task_b]["npy"]),
                                   rtol=1e-4, atol=1e-5)
        assert body["experts"][task_b] == reference["experts"][task_b]
    streamed = streaming.get("/api/info").json()["memory"]["streamed"]
    assert streamed["peak_live_buffers"] <= 2 and streamed["expert_reads"] > 0


def test_task_switch_reloads_nothing_in_resident_mode(client, to_png, make_image):
    data = to_png(make_image(32, 32, seed=5))
    before = client.get("/api/info").json()
    for tasks in ("semseg", "depth", "semseg", "edge,sal", "depth"):
        body = post(client, data, tasks=tasks).json()
        assert body["model_loads"] == 1
        assert all(entry["experts_read"] == 0 and entry["bytes_read"] == 0 for entry in body["tasks"].values())
    after = client.get("/api/info").json()
    assert after["model_loads"] == before["model_loads"] == 1
    assert after["requests_served"] == before["requests_served"] + 5


def test_a_dense_model_has_no_experts_to_show(make_client, to_png, make_image):
    import m3vit

    torch.manual_seed(0)
    dense = m3vit.create_model("mvit_micro", ["semseg", "depth"], img_size=(32, 32))
    client = make_client(dense)
    info = client.get("/api/info").json()
    assert info["num_experts"] == 0 and info["moe_blocks"] == [] and info["memory"]["expert_weights_mb"] == 0
    body = post(client, to_png(make_image(20, 24)), tasks="depth").json()
    assert body["experts"] == {"depth": []} and png_array(body["tasks"]["depth"]["png"]).shape == (20, 24, 3)


def test_openapi_describes_the_predict_form(client):
    schema = client.get("/api/openapi.json").json()
    form = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and set(form["properties"]) == {"image", "tasks", "raw"}


# ------------------------------------------------------------------------------------------------
# Building the app
# ------------------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors(checkpoint):
    model = load_checkpoint(checkpoint)
    with pytest.raises(InputError, match="--workers"):
        create_app(model, workers=0)
    with pytest.raises(InputError, match="--queue-size"):
        create_app(model, queue_size=-1)
    with pytest.raises(InputError, match="--max-upload-mb"):
        create_app(model, max_upload_mb=0)
    with pytest.raises(InputError, match="checkpoint"):
        create_app(model, stream_experts=True)
    with pytest.raises(FileNotFoundError):
        create_app(checkpoint.parent / "missing", device="cpu")


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from m3vit.serve import app as serve_app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ImportError, match=r"uvicorn.*pip install m3vit\[serve\]"):
        serve_app.require_serve_extra()


# ------------------------------------------------------------------------------------------------
# Clients that stall, hang up or probe
# ------------------------------------------------------------------------------------------------
def _start_upload(url: str, boundary: str = "m3vit-stall"):
    """A raw connection that sends the headers and the start of a multipart body, then stalls."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port))
    sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                 f"\r\nContent-Length: 500000\r\n\r\n--{boundary}".encode())
    return sock


def test_a_stalled_upload_frees_its_slot_after_the_upload_timeout(checkpoint, to_png, make_image):
    """A client that never finishes its upload holds a request slot for ``upload_timeout_s`` at most (408);
    then the server answers others again."""
    import httpx2

    app = create_app(checkpoint, device="cpu", workers=1, queue_size=0, upload_timeout_s=3.0)
    with running_server(app) as url:
        stalled = _start_upload(url)
        try:
            deadline = time.monotonic() + 30
            while app.state.service.in_flight < 1:  # the stalled upload holds the only slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with httpx2.Client(base_url=url, timeout=60) as http:
                image = {"image": ("x.png", to_png(make_image(16, 16)), "image/png")}
                assert http.post("api/predict", files=image, data={"tasks": "sal"}).status_code == 503
                stalled.settimeout(10)
                reply = stalled.recv(4096).decode()
                assert reply.startswith("HTTP/1.1 408") and "the upload took longer than 3 s" in reply
                assert http.post("api/predict", files=image, data={"tasks": "sal"}).status_code == 200
        finally:
            stalled.close()


def test_a_client_hanging_up_mid_upload_is_not_logged_as_a_bug(checkpoint, to_png, make_image, caplog):
    import httpx2

    app = create_app(checkpoint, device="cpu")
    with running_server(app) as url, caplog.at_level(logging.DEBUG, logger="m3vit.serve.app"):
        _start_upload(url).close()
        deadline = time.monotonic() + 30
        while "disconnected during the upload" not in caplog.text:  # the server noticed the hang-up
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        with httpx2.Client(base_url=url, timeout=60) as http:
            image = {"image": ("x.png", to_png(make_image(16, 16)), "image/png")}
            assert http.post("api/predict", files=image, data={"tasks": "sal"}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "disconnected during the upload" in caplog.text


def test_head_works_where_get_does_and_405_says_what_is_allowed(client):
    for path in ("/", "/api/health", "/api/info"):
        assert client.head(path).status_code == 200, path
    answer = client.get("/api/predict")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"


@pytest.mark.parametrize("fmt", ["ICO", "EPS", "PDF"])
def test_formats_that_decode_before_the_size_check_or_run_ghostscript_are_refused(client, make_image, fmt):
    """PIL decodes an ICO's embedded image before its size can be checked, and hands EPS/PDF to
    Ghostscript: neither is read at all."""
    buf = io.BytesIO()
    picture = Image.fromarray(make_image(16, 16))
    try:
        picture.save(buf, format=fmt)
    except OSError:  # EPS needs no Ghostscript to write, PDF neither; skip where PIL cannot write it
        pytest.skip(f"PIL cannot write {fmt} here")
    assert_error(post(client, buf.getvalue(), filename=f"x.{fmt.lower()}"), 400, "not an image in a format m3vit reads")


def test_ambiguous_or_oversized_fields_are_refused_without_echoing_them(client, to_png, make_image):
    image = to_png(make_image(16, 16))
    twice = client.post("/api/predict", files=[("image", ("a.png", image, "image/png")),
                                               ("image", ("b.png", image, "image/png"))])
    assert_error(twice, 400, "'image' field is sent 2 times")
    assert_error(post(client, image, raw=["true", "bogus"]), 400, "'raw' field is sent 2 times")
    as_file = client.post("/api/predict", files={"image": ("a.png", image, "image/png"),
                                                 "tasks": ("t.txt", b"sal", "text/plain")})
    assert_error(as_file, 400, "must be text, not file uploads")
    long = post(client, image, tasks="x" * 100_000)
    assert_error(long, 400, "unknown task(s) 'xxxx")
    assert len(long.content) < 1000
