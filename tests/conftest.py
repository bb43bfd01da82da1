"""Shared fixtures: the real encoder, a private Redis server, and both store backends.

Redis tests never touch a Redis they did not start: a private ``redis-server``
runs on a free port for the session (set RECSVC_TEST_REDIS_URL to use another
server; keys then live under a unique prefix and are deleted afterwards).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from app.tools.processes import free_port, wait_port  # noqa: F401 - tests import them from here

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


class RedisClusterServers:
    """A private 3-node Redis Cluster (3 masters, no replicas) on free ports."""

    def __init__(self, nodes: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="recsvc-cluster-")
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        while len(self.ports) < nodes:
            port = free_port()
            if port + 10000 < 65536 and _port_free(port + 10000):  # the cluster bus port
                self.ports.append(port)
        for port in self.ports:
            node_dir = os.path.join(self.dir, str(port))
            os.mkdir(node_dir)
            self.procs.append(subprocess.Popen(
                [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--dir", node_dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_port(port)
        subprocess.run([shutil.which("redis-cli"), "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.time() + 30
        while not all(self._ok(p) for p in self.ports):
            if time.time() > deadline:
                raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.2)
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    @staticmethod
    def _ok(port: int) -> bool:
        out = subprocess.run([shutil.which("redis-cli"), "-p", str(port), "cluster", "info"],
                             capture_output=True, text=True, timeout=10).stdout
        return "cluster_state:ok" in out

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="session")
def redis_cluster_url():
    """A node of a private 3-node Redis Cluster, started for the session."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.exit("redis-server and redis-cli are needed: the store tests run against a "
                    "real Redis and a real Redis Cluster (apt-get install redis-server)",
                    returncode=3)
    cluster = RedisClusterServers()
    yield cluster.url
    cluster.stop()


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
