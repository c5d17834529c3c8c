"""``m3vit serve``: one loaded model answering any subset of its tasks per request, as an HTTP API and a web page.

``create_app(model_or_checkpoint, ...)`` builds the FastAPI app (``app``), ``PredictionService`` is
the framework-free model side (``service``), ``serve`` / ``running_server`` run it under uvicorn
(``server``). FastAPI and uvicorn are imported only when an app is built or served (the ``serve``
extra: ``pip install m3vit[serve]``). This is the top library layer: nothing in m3vit imports it.
"""

from .app import STATIC_DIR, create_app, require_serve_extra
from .server import bind_socket, running_server, serve, url_of
from .service import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_QUEUE_SIZE,
    PathwayRun,
    PredictionService,
    RequestError,
    ServiceBusyError,
    process_memory_mb,
    read_image_bytes,
)

__all__ = ["create_app", "require_serve_extra", "STATIC_DIR", "serve", "running_server", "bind_socket", "url_of",
           "PredictionService", "PathwayRun", "RequestError", "ServiceBusyError", "read_image_bytes",
           "process_memory_mb", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_MAX_PIXELS", "DEFAULT_QUEUE_SIZE"]
