"""Start ``recsvc serve`` as a subprocess for a benchmark, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile

from app.client import wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(env: dict[str, str] | None = None, startup_s: float = 120.0):
    """Yield the base URL of a fresh service; its log is printed if it fails to start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+", prefix="recsvc-bench-") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            if not wait_ready(url, lambda: proc.poll() is None, startup_s):
                log.seek(0)
                raise RuntimeError(f"service did not start:\n{log.read()}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
