"""Shared fixtures: the real encoder, a private Redis server, and both store backends.

Redis tests never touch a Redis they did not start: a private ``redis-server``
runs on a free port for the session (set RECSVC_TEST_REDIS_URL to use another
server; keys then live under a unique prefix and are deleted afterwards).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from bench.server import free_port, wait_port  # noqa: F401 - tests import them from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each test service would otherwise commit ~0.5 GB of replay buffer (1.4 s) at start;
# tests/test_qnet_learner.py covers prefaulting itself.
os.environ.setdefault("RECSVC_REPLAY_PREFAULT", "false")


class RedisServer:
    """A private redis-server process on a free port, in a temporary directory."""

    def __init__(self, persistent: bool = False) -> None:
        """``persistent``: an append-only file synced on every write, so the server can
        be killed and started again (``start``) without losing data."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.exit("redis-server is not installed: the store tests run against a real "
                        "Redis. Install it (Debian/Ubuntu: apt-get install redis-server; "
                        "macOS: brew install redis) or set RECSVC_TEST_REDIS_URL.", returncode=3)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="recsvc-redis-")
        self.aof = ["--appendonly", "yes", "--appendfsync", "always"] if persistent \
            else ["--appendonly", "no"]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *self.aof, "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    external = os.environ.get("RECSVC_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer()
    yield server.url
    server.stop()


async def _drop_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await r.delete(*keys)
    await r.aclose()


@pytest.fixture
def redis_prefix(redis_url):
    """A unique key prefix whose keys are all deleted after the test."""
    prefix = f"recsvc-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    asyncio.run(_drop_prefix(redis_url, prefix))


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    """Name of a store backend and settings overrides that select it."""
    if request.param == "memory":
        return "memory", {}
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return "redis", {"redis_url": url, "key_prefix": prefix}


@pytest.fixture(scope="session")
def encoder():
    from models.encoder import TextEncoder

    return TextEncoder(os.environ.get("RECSVC_ENCODER_PATH") or None)  # a model of your own
