"""``m3vit serve`` on the command line: its options, its errors, and a real start / request / Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install m3vit[serve])")

from m3vit.cli import build_parser, main  # noqa: E402
from m3vit.serve import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB, DEFAULT_QUEUE_SIZE  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_defaults_are_the_services_and_localhost():
    args = build_parser().parse_args(["serve", "--checkpoint", "C"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.workers == 1
    assert args.max_upload_mb == DEFAULT_MAX_UPLOAD_MB and args.max_pixels == DEFAULT_MAX_PIXELS
    assert args.queue_size == DEFAULT_QUEUE_SIZE and not args.stream_experts and args.device == "auto"


def test_bad_checkpoint_options_and_busy_port_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    assert main(["serve", "--checkpoint", str(checkpoint), "--port", "0", "--workers", "0", "--device", "cpu"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen" in err and str(port) in err and err.count("\n") == 1


def test_a_missing_extra_is_one_line_naming_the_install_command(checkpoint, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err == "error: m3vit serve needs fastapi (not installed): pip install m3vit[serve]\n"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_starts_prints_its_url_answers_and_stops_cleanly(checkpoint, stop):
    """Ctrl-C and SIGTERM (what ``kill``, systemd and docker send) both end with the clean shutdown, the
    ``stopped`` line and status 0."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "m3vit", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                             "--device", "cpu", "--stream-experts"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the socket listens
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert "Ctrl-C" in line and "streamed" in line
        with urllib.request.urlopen(url + "api/health", timeout=30) as answer:
            assert json.load(answer) == {"status": "ok"}
        with urllib.request.urlopen(url + "api/info", timeout=30) as answer:
            assert json.load(answer)["streaming"] is True
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert "Traceback" not in err
