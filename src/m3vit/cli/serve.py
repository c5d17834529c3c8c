"""``m3vit serve``: the web page and HTTP API of ``m3vit.serve``, one loaded model answering any subset of its
tasks."""

from __future__ import annotations

import signal

from .common import CLIError, add_device_option, device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="web page and HTTP API: one loaded model answering any subset of its "
                                            "tasks")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (loaded once)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the "
                        "network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--stream-experts", action="store_true",
                   help="keep expert weights in the checkpoint file and read them two at a time per MoE layer")
    add_device_option(p)
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="N",
                   help="largest upload accepted, in MB (default 20; larger: 413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest image accepted, in pixels (default 16777216 = 4096x4096; larger: 413)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="model replicas, each answering one request at a time on its own thread (default 1; each "
                        "replica holds its own copy of the weights)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="requests that may wait for a free replica (default 8); more at once get 503")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..serve import bind_socket, create_app, require_serve_extra, serve

    try:
        require_serve_extra()
    except ImportError as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    try:  # before loading the model: a port in use fails at once
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        app = create_app(args.checkpoint, stream_experts=args.stream_experts, device=device(args.device),
                         workers=args.workers, queue_size=args.queue_size, max_upload_mb=args.max_upload_mb,
                         max_pixels=args.max_pixels)
    except BaseException:
        sock.close()
        raise
    info = app.state.service.info()

    def ready(url: str) -> None:
        experts = "experts streamed from the checkpoint" if info["streaming"] else "experts resident"
        print(f"m3vit serve: {info['model']} ({', '.join(info['tasks'])}; {experts}; {info['device']}) "
              f"at {url}  (Ctrl-C to stop)", flush=True)

    # uvicorn shuts down cleanly on Ctrl-C and SIGTERM, then raises the signal again with the handler it
    # found: SIGTERM's default would end the process (status 143) before the lines below; this one makes it
    # end like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(app, sock=sock, log_level="info" if args.verbose else "warning", on_ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C (and so SIGTERM) after its clean shutdown
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.state.service.close()  # already closed by the app's shutdown, unless uvicorn failed to start
    print("m3vit serve: stopped", flush=True)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
