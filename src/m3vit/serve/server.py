"""Running the ``m3vit serve`` app under uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks).

The listening socket is bound here before uvicorn starts, so the URL printed is the one that works
(``port=0`` picks a free port) and a port in use fails at once with ``OSError``. In the foreground,
uvicorn handles Ctrl-C (SIGINT) and SIGTERM: it stops accepting, lets requests in progress finish,
runs the app's shutdown (the workers stop, streamers close), then re-raises the signal, so Ctrl-C
arrives as ``KeyboardInterrupt`` after a clean shutdown.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .app import require_serve_extra

__all__ = ["bind_socket", "url_of", "serve", "running_server"]


def bind_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port); ``OSError`` when it cannot bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port/`` of a bound socket (a wildcard address is shown as the loopback one)."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _uvicorn_server(app, log_level: str):
    require_serve_extra()
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
          log_level: str = "warning", on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM on ``host:port`` (or on ``sock``, from ``bind_socket``, which it
    then closes); ``on_ready(url)`` is called once the socket listens.

    Ctrl-C ends with ``KeyboardInterrupt`` after the clean shutdown (see the module docstring).
    """
    if sock is None:
        sock = bind_socket(host, port)
    try:
        server = _uvicorn_server(app, log_level)
        if on_ready is not None:
            on_ready(url_of(sock))
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                   timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a background thread for the ``with`` block; yields its URL, then shuts it down."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="m3vit-serve-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if failure or not thread.is_alive():
                raise RuntimeError(f"the server did not start: {failure[0] if failure else 'thread exited'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout:g} s")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
