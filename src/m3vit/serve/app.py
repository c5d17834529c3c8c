"""The HTTP side of ``m3vit serve``: a FastAPI app around a ``PredictionService`` (JSON API + the static page).

``create_app(model_or_checkpoint, ...)`` builds it; FastAPI is imported only then, so ``import m3vit``
and ``import m3vit.serve`` work without the ``serve`` extra. Routes:

* ``GET /`` the page (``static/index.html``, ``/static/app.js``, ``/static/style.css``; no CDN);
* ``GET /api/health`` -> ``{"status": "ok"}``;
* ``GET /api/info`` -> the model, tasks, experts, limits, memory and counters (``PredictionService.info``);
* ``POST /api/predict`` multipart: file field ``image``, optional ``tasks`` (comma-separated; default
  every task) and ``raw`` (``true`` adds each task's decoded values as a base64 ``.npy``).

Every refusal is JSON ``{"error": "<one line saying what to fix>"}``: 400 (not an image, unknown task,
malformed form), 404/405, 413 (upload or pixel count over the limit), 503 (queue full). Anything else
is a bug: 500 with the exception's type, its traceback logged (and re-raised to the ASGI server).
"""

import asyncio
import importlib.util
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from .service import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_QUEUE_SIZE,
    PredictionService,
    RequestError,
    ServiceBusyError,
)

__all__ = ["create_app", "require_serve_extra", "STATIC_DIR"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


# The multipart form of POST /api/predict, for /api/openapi.json (the handler parses the form itself).
_PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the image file (PNG, JPEG, ...)"},
        "tasks": {"type": "string", "description": "comma-separated task names (default: every task)"},
        "raw": {"type": "boolean", "description": "add each task's decoded values as a base64 .npy"}}}}}}}


def require_serve_extra() -> None:
    """``ImportError`` in one line naming the install command when FastAPI, uvicorn or python-multipart is missing."""
    wanted = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
    missing = [name for name, modules in wanted.items()
               if not any(importlib.util.find_spec(m) is not None for m in modules)]
    if missing:
        raise ImportError(f"m3vit serve needs {', '.join(missing)} (not installed): pip install m3vit[serve]")


def _parse_bool(field: str, value) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"the {field!r} field must be true or false, got {str(value)[:40]!r}")


#: Seconds a client has to send its whole upload; a slower one is answered 408 and frees its request slot.
UPLOAD_TIMEOUT_S = 30.0


def create_app(model_or_checkpoint, *, stream_experts: bool = False, device=None, workers: int = 1,
               queue_size: int = DEFAULT_QUEUE_SIZE, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = DEFAULT_MAX_PIXELS, upload_timeout_s: float = UPLOAD_TIMEOUT_S):
    """A FastAPI app serving ``model_or_checkpoint`` (a ``MultiTaskModel`` or a checkpoint directory).

    ``workers`` model replicas each run on their own thread (a checkpoint is loaded that many times; a
    model object is deep-copied); at most ``workers + queue_size`` requests are in progress at once,
    more get 503; a request whose upload takes longer than ``upload_timeout_s`` gets 408, so a stalled
    client holds a slot that long at most. ``stream_experts`` and ``device`` (default ``auto``) apply to a
    checkpoint. The service is ``app.state.service``; it is closed when the app shuts down.
    """
    require_serve_extra()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    service = PredictionService.load(model_or_checkpoint, stream_experts=stream_experts, device=device,
                                     workers=workers, queue_size=queue_size, max_upload_mb=max_upload_mb,
                                     max_pixels=max_pixels)

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    from .. import __version__

    # No Swagger/ReDoc pages: they load their scripts from a CDN, and everything here must work offline.
    app = FastAPI(title="m3vit serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.service = service

    def error(status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error(exc.status, str(exc))

    @app.exception_handler(ServiceBusyError)
    async def _busy(request: Request, exc: ServiceBusyError):
        return error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = (f"no such page: {request.method} {request.url.path} (the page is /; the API is "
                       f"/api/health, /api/info and POST /api/predict)")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            if request.url.path.rstrip("/") == "/api/predict":
                message += " (send a multipart POST with the image in field 'image')"
        else:
            message = str(exc.detail)
        return error(exc.status_code, message, getattr(exc, "headers", None))  # a 405's Allow

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("%s %s failed (a bug in m3vit serve)", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal server error ({type(exc).__name__}); this is a bug, the traceback is in "
                          f"the server log")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health")
    async def health():
        return {"status": "ok"}

    @app.get("/api/info")
    async def info():
        return service.info()

    for path, endpoint in (("/api/health", health), ("/api/info", info)):  # HEAD: what health probes send
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.post("/api/predict", openapi_extra=_PREDICT_FORM)
    async def predict(request: Request):
        """Multipart: file ``image``; optional ``tasks`` (comma-separated, default all) and ``raw`` (true/false)."""
        with service.admit():
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit():
                service.check_upload_size(int(declared))
            content_type = request.headers.get("content-type", "")
            if not content_type.lower().startswith("multipart/form-data"):
                raise RequestError("send multipart/form-data with the image file in field 'image' (and optionally "
                                   "'tasks', comma-separated)")
            received = 0

            async def limited_receive():  # the limit also holds when no Content-Length was sent
                nonlocal received
                message = await request.receive()
                received += len(message.get("body", b""))
                service.check_upload_size(received)
                return message

            try:
                form = await asyncio.wait_for(Request(request.scope, limited_receive).form(max_files=4, max_fields=16),
                                              upload_timeout_s)
            except TimeoutError:
                raise RequestError(f"the upload took longer than {upload_timeout_s:g} s; send it again faster or a "
                                   f"smaller image", status=408) from None
            except ClientDisconnect:  # the client went away mid-upload: nobody to answer, and not a bug
                log.debug("POST /api/predict: the client disconnected during the upload")
                return Response(status_code=400)
            try:
                for name in ("image", "raw"):  # which of two would count is a guess: refuse it
                    if len(form.getlist(name)) > 1:
                        raise RequestError(f"the {name!r} field is sent {len(form.getlist(name))} times; send it once")
                upload = form.get("image")
                if upload is None:
                    raise RequestError("no 'image' field; send the image file as multipart field 'image'")
                if not isinstance(upload, UploadFile):
                    raise RequestError("the 'image' field must be a file upload, not text")
                if any(not isinstance(form.get(name, ""), str) for name in ("tasks", "raw")) or any(
                        not isinstance(t, str) for t in form.getlist("tasks")):
                    raise RequestError("the 'tasks' and 'raw' fields must be text, not file uploads")
                tasks = service.resolve_tasks(",".join(form.getlist("tasks")))
                raw = _parse_bool("raw", form.get("raw", ""))
                data = await upload.read()
            finally:
                await form.close()
            image = await run_in_threadpool(service.read_image, data)
            runs = await asyncio.wrap_future(service.submit(image, tasks))
            return await run_in_threadpool(service.encode, image.shape[-2:], runs, raw)

    return app

