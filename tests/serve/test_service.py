"""The framework-free side of ``m3vit serve``: upload decoding, task names, admission, memory, imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3vit.models import load_checkpoint
from m3vit.serve import PredictionService, RequestError, ServiceBusyError, process_memory_mb, read_image_bytes


@pytest.fixture(scope="module")
def service(checkpoint):
    svc = PredictionService.load(checkpoint, device="cpu", queue_size=1)
    yield svc
    svc.close()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_an_image_or_a_400(data):
    """Whatever a client uploads, the answer is an image or a RequestError, never another exception (a 500)."""
    try:
        image = read_image_bytes(data, max_pixels=10_000)
    except RequestError as exc:
        assert exc.status in (400, 413) and "\n" not in str(exc)
    else:
        assert image.dim() == 3 and image.shape[0] == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 40), width=st.integers(1, 40), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]),
       fmt=st.sampled_from(["PNG", "BMP", "TIFF"]), data=st.data())
def test_images_decode_to_their_size_and_the_pixel_limit_is_exact(to_png, height, width, mode, fmt, data):
    from PIL import Image
    import io

    if mode == "I;16" and fmt == "BMP":
        fmt = "PNG"
    rng = np.random.default_rng(height * 41 + width)
    rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257).convert("I;16")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    limit = data.draw(st.integers(1, 2000))
    if height * width > limit:
        with pytest.raises(RequestError) as info:
            read_image_bytes(buf.getvalue(), max_pixels=limit)
        assert info.value.status == 413
    else:
        image = read_image_bytes(buf.getvalue(), max_pixels=limit)
        assert tuple(image.shape) == (3, height, width)
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


@given(st.lists(st.sampled_from(["semseg", "sal", "normals", "depth", "edge", "human_parts", "seg", "", " ", "SAL"]),
                max_size=6))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_task_names_resolve_or_are_a_400(service, serve_tasks, names):
    text = ",".join(names)
    given_names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in given_names if n not in serve_tasks]
    if unknown:
        with pytest.raises(RequestError) as info:
            service.resolve_tasks(text)
        assert info.value.status == 400 and all(t in str(info.value) for t in serve_tasks)
    else:
        expected = list(dict.fromkeys(given_names)) or serve_tasks
        assert service.resolve_tasks(text) == expected


def test_admission_is_bounded_by_workers_plus_queue(service):
    assert service.workers == 1 and service.queue_size == 1
    with service.admit(), service.admit():
        assert service.in_flight == 2
        with pytest.raises(ServiceBusyError, match="busy"):
            with service.admit():
                pass
    assert service.in_flight == 0
    with service.admit():
        pass


def test_predict_without_http_matches_the_model(service, checkpoint, to_png, make_image):
    from m3vit.engine.inference import predict

    array = make_image(24, 32, seed=7)
    body = service.predict(to_png(array), "depth", raw=True)
    assert list(body["tasks"]) == ["depth"] and body["image_size"] == [24, 32]
    model = load_checkpoint(checkpoint)
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
    expected = predict(model, [image], ["depth"], out_size=image.shape[-2:])["depth"][0]
    import base64
    import io

    values = np.load(io.BytesIO(base64.b64decode(body["tasks"]["depth"]["npy"])))
    np.testing.assert_allclose(values, expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_process_memory_is_this_process(service):
    rss, peak = process_memory_mb()
    assert 0 < rss <= peak
    with open("/proc/self/status") as f:
        vm_rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    assert abs(rss - vm_rss) < 0.2 * vm_rss


def test_closed_service_refuses_requests(checkpoint):
    svc = PredictionService.load(checkpoint, device="cpu", stream_experts=True)
    streamer = svc.model.expert_streamer
    svc.close()
    assert streamer.closed  # the service opened it, the service closes it
    with pytest.raises(ServiceBusyError, match="shutting down"):
        with svc.admit():
            pass
    svc.close()  # twice is fine


def test_importing_m3vit_serve_needs_no_web_framework():
    code = ("import sys, m3vit, m3vit.serve, m3vit.cli; "
            "loaded = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_replicas_of_a_model_object_are_copies_that_answer_alike(checkpoint, to_png, make_image):
    model = load_checkpoint(checkpoint)
    svc = PredictionService.load(model, workers=2)
    try:
        assert svc.replicas[0] is model and svc.replicas[1] is not model and svc.model_loads == 2
        a, b = svc.replicas
        assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
        data = to_png(make_image(16, 16, seed=8))
        answers = [svc.predict(data, "sal", raw=True)["tasks"]["sal"]["npy"] for _ in range(4)]
        assert len(set(answers)) == 1
    finally:
        svc.close()
