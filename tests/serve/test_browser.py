"""The ``m3vit serve`` page in a real headless Chromium (Debian's ``chromium`` driven by Playwright).

A real uvicorn server runs in a thread; the browser loads the page, sets an image on the file input,
waits for the task maps, toggles tasks and checks what is displayed against the API, then takes a
screenshot (``M3VIT_SERVE_SCREENSHOT=path`` keeps a copy, e.g. ``docs/serve.png``). Skipped, saying
why, when Chromium or Playwright is missing: ``scripts/setup.sh`` installs Chromium when run as root.
Playwright's own browser downloads are never used (``executable_path`` is the system binary).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install m3vit[serve])")

from m3vit.serve import create_app, running_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECKED = ["semseg", "sal", "normals", "edge", "human_parts"]  # depth is unchecked before the upload


def _chromium() -> str | None:
    path = os.environ.get("M3VIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


@pytest.fixture
def browser_page(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary: install Debian's package (apt-get install chromium, or run "
                    "scripts/setup.sh as root) or set M3VIT_CHROMIUM to a Chromium executable")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright; part of the dev "
                    "extra; no 'playwright install' needed, the system chromium is used)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860})
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


def _answered_tasks(response) -> str:
    return ",".join(response.json()["tasks"])


def _data_url_pixels(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_the_page_shows_task_maps_toggles_them_and_reports_errors(browser_page, checkpoint, make_image, to_png,
                                                                  serve_tasks, tmp_path):
    import httpx2

    page = browser_page
    app = create_app(checkpoint, device="cpu")
    image = to_png(make_image(72, 96, seed=11))
    predict_answers = []  # the page's POST /api/predict answers (a File body is not visible to Playwright)
    page.on("response", lambda r: predict_answers.append(r)
            if r.request.method == "POST" and r.url.endswith("/api/predict") else None)

    with running_server(app) as url:
        page.goto(url)
        boxes = page.locator('input[name="task"]')
        boxes.first.wait_for()
        assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == serve_tasks
        assert "m3vit_micro" in page.locator("#model-info").inner_text()
        page.locator('input[name="task"][value="depth"]').uncheck()

        # Upload: one request for the checked tasks; one map per checked task at the image's size.
        page.set_input_files('input[type="file"]', files=[{"name": "scene.png", "mimeType": "image/png",
                                                            "buffer": image}])
        page.wait_for_function("n => [...document.querySelectorAll('img[data-task]')]"
                               ".filter(i => i.complete && i.naturalWidth > 0).length === n", arg=len(CHECKED))
        assert len(predict_answers) == 1 and _answered_tasks(predict_answers[0]) == ",".join(CHECKED)
        assert page.locator("img[data-task]").count() == len(CHECKED)
        assert page.locator('img[data-task="depth"]').count() == 0
        assert page.locator("#source-image").is_visible()
        with httpx2.Client(base_url=url, timeout=60) as http:
            api = http.post("api/predict", files={"image": ("scene.png", image, "image/png")},
                            data={"tasks": ",".join(CHECKED)}).json()
        for task in CHECKED:
            img = page.locator(f'img[data-task="{task}"]')
            assert img.is_visible()
            assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [96, 72]
            shown = _data_url_pixels(img.get_attribute("src"))
            np.testing.assert_array_equal(shown, _data_url_pixels("data:image/png;base64," + api["tasks"][task]["png"]))
            latency = page.locator(f'[data-task-latency="{task}"]').inner_text()
            assert re.fullmatch(r"\d+\.\d ms", latency), latency
            heatmap = page.locator(f'canvas[data-task-experts="{task}"]')
            assert heatmap.is_visible() and heatmap.evaluate("c => c.width") > 0
            assert heatmap.evaluate("c => JSON.parse(c.dataset.counts)") == api["experts"][task]

        # Toggling a map that is there: hidden and shown again without another request.
        sal = page.locator('input[name="task"][value="sal"]')
        sal.uncheck()
        assert page.locator('img[data-task="sal"]').count() == 0
        sal.check()
        page.locator('img[data-task="sal"]').wait_for()
        assert len(predict_answers) == 1

        # Checking a task without a map asks for that task only.
        page.locator('input[name="task"][value="depth"]').check()
        page.wait_for_function("() => { const i = document.querySelector('img[data-task=\"depth\"]');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert len(predict_answers) == 2 and _answered_tasks(predict_answers[1]) == "depth"
        assert page.locator("img[data-task]").count() == len(serve_tasks)

        # The opacity slider overlays the map on the image.
        page.locator('input[data-task-opacity="semseg"]').fill("30")
        assert page.locator('img[data-task="semseg"]').evaluate("i => i.style.opacity") == "0.3"

        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[0] == 1280
        keep = os.environ.get("M3VIT_SERVE_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)

        # An error from the API is shown on the page, as text.
        assert page.locator("#error").is_hidden()
        page.set_input_files('input[type="file"]', files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                            "buffer": b"not a picture"}])
        page.locator("#error").wait_for(state="visible")
        assert "not an image" in page.locator("#error").inner_text()
        assert page.locator("img[data-task]").count() == 0
