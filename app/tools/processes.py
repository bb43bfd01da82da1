"""``recsvc serve`` (or ``recsvc learner``) and a private ``redis-server`` as
subprocesses on free ports, stopped afterwards: what the benchmarks and the
end-to-end tests run against."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.tools.client import wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, alive=lambda: True) -> None:
    """Return once something listens on ``port``; ``TimeoutError`` after ``timeout`` s,
    or at once when ``alive()`` turns false (the process meant to listen died)."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


@contextlib.contextmanager
def running_service_process(env: dict[str, str] | None = None, startup_s: float = 120.0,
                            command: str = "serve", log_path: Path | None = None,
                            inherit_settings: bool = True):
    """Yield ``(base URL, process)`` of a fresh ``recsvc serve`` (or ``recsvc learner``,
    whose port answers /readyz too); its log is printed if it fails to start, and
    kept in ``log_path`` when one is given. Without ``inherit_settings`` the process
    sees none of this one's ``RECSVC_`` variables, only ``env``'s."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items()
            if inherit_settings or not k.startswith("RECSVC_")}
    with (open(log_path, "w+") if log_path is not None
          else tempfile.TemporaryFile("w+", prefix="recsvc-bench-")) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.tools.cli", command, "--port", str(port)],
            env={**base, **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT)
        try:
            if not wait_ready(url, lambda: proc.poll() is None, startup_s):
                log.seek(0)
                raise RuntimeError(f"service did not start:\n{log.read()}")
            yield url, proc
        finally:
            stop(proc, grace_s=20)


@contextlib.contextmanager
def running_service(env: dict[str, str] | None = None, startup_s: float = 120.0):
    """Yield the base URL of a fresh service."""
    with running_service_process(env, startup_s) as (url, _):
        yield url


@contextlib.contextmanager
def private_redis(workdir: str | None = None):
    """Yield the URL of a private ``redis-server`` on a free port, stopped afterwards.

    With no ``workdir`` it persists nothing and its files are removed. With one, it
    loads ``workdir/dump.rdb`` if there is one and writes one when sent ``SAVE``
    (never on its own), so a benchmark can keep an expensive state, such as an
    embedded catalog, between runs."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="recsvc-bench-redis-"))
        os.makedirs(workdir, exist_ok=True)
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, timeout=120, alive=lambda: proc.poll() is None)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop(proc, grace_s=30)
