"""``recsvc serve --workers N``: N processes answer on one port, over one Redis.

Each worker builds its own engine and follows the store as an API replica does; each
runs a learner, and the store's lease lets one learn. The embedded store keeps its
state in one process, so there the command serves with one and says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from app.tools.processes import stop
from tests.conftest import RedisServer, free_port, wait_port
from tests.test_api import MOVIES, wait_for
from tests.test_topology import ENV, ROOT


def _children(pid: int) -> list[int]:
    """The worker processes uvicorn spawned under ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def _serve(tmp_path: Path, extra_env: dict[str, str], workers: int):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RECSVC_REDIS_URL"}, **ENV,
           "RECSVC_ROLE": "all", **extra_env}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.tools.cli", "serve", "--port", str(port),
             "--workers", str(workers)], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_port(port, timeout=120, alive=lambda: proc.poll() is None)
    wait_for(lambda: httpx.get(url + "/readyz", timeout=10).status_code == 200, 120,
             "the service ready")
    return proc, url, log


def test_two_workers_answer_on_one_port_and_one_of_them_learns(tmp_path):
    server = RedisServer()
    proc = None
    try:
        proc, url, log = _serve(tmp_path, {"RECSVC_REDIS_URL": server.url}, 2)
        workers = wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 60,
                           "two worker processes")
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                    for i, t in MOVIES]})
            assert r.status_code == 200, r.text
            # each worker follows the catalog written through the other
            wait_for(lambda: all(c.get("/readyz").json()["catalog_size"] == len(MOVIES)
                                 for _ in range(8)), 30, "the catalog in every worker")
            accepted = 0
            for n in range(30):
                slate = c.post("/v1/recommend", json={"user_id": f"u{n % 5}", "k": 3})
                assert slate.status_code == 200, slate.text
                body = slate.json()
                assert len(body["items"]) == 3
                r = c.post("/v1/feedback", json={"request_id": body["request_id"],
                                                 "item_id": body["items"][0]["item_id"],
                                                 "event": "click"})
                assert r.status_code == 202, r.text
                accepted += 1
            # learned once each, by the one worker holding the lease
            wait_for(lambda: c.get("/v1/model").json()["feedback_learned"] == accepted, 60,
                     "every click learned")
            assert c.get("/v1/model").json()["feedback_learned"] == accepted
        holder = redis.Redis.from_url(server.url).get("recsvc:{model}:lease")
        assert holder is not None
        assert int(holder.decode().split("-")[-2]) in workers, (holder, workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not _children(proc.pid)
        assert log.read_text().count("shutdown complete") == 2
    except BaseException:
        if proc is not None:
            print((tmp_path / "serve.log").read_text()[-4000:])
        raise
    finally:
        if proc is not None and proc.poll() is None:
            stop(proc, grace_s=30)
        server.stop()


def test_workers_on_the_embedded_store_serve_from_one_process_and_say_so(tmp_path):
    proc = None
    try:
        proc, url, log = _serve(tmp_path, {}, 2)
        assert not _children(proc.pid)
        assert "serving with one process, not 2" in log.read_text()
        assert httpx.get(url + "/readyz", timeout=10).json()["status"] == "ready"
    finally:
        if proc is not None:
            stop(proc, grace_s=30)
