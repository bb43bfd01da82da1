"""``recsvc serve --workers N``: N processes answer on one port, over one Redis.

Each worker builds its own engine and follows the store as an API replica does; each
runs a learner, and the store's lease lets one learn. The embedded store keeps its
state in one process, so there the command serves with one and says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import redis

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


class Served:
    """``recsvc serve --workers N`` in its own process group, so that the supervisor and
    its workers are all stopped at the end, whatever happened."""

    def __init__(self, tmp_path: Path, extra_env: dict[str, str], workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        env = {**{k: v for k, v in os.environ.items() if k != "RECSVC_REDIS_URL"}, **ENV,
               "RECSVC_ROLE": "all", **extra_env}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.tools.cli", "serve", "--port", str(self.port),
                 "--workers", str(workers)], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> None:
        wait_port(self.port, timeout=120, alive=lambda: self.proc.poll() is None)
        wait_for(lambda: self.get("/readyz").status_code == 200, 120, "the service ready")

    def get(self, path: str) -> httpx.Response:
        # a new connection each time: a kept-alive one would stay with one worker
        return httpx.get(self.url + path, timeout=30, headers={"Connection": "close"})

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30,
                          headers={"Connection": "close"})

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_two_workers_answer_on_one_port_and_one_of_them_learns(tmp_path):
    server = RedisServer()
    served = Served(tmp_path, {"RECSVC_REDIS_URL": server.url}, 2)
    try:
        served.ready()
        workers = wait_for(lambda: len(_children(served.proc.pid)) == 2
                           and _children(served.proc.pid), 60, "two worker processes")
        r = served.post("/v1/items", {"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        assert r.status_code == 200, r.text
        # each worker follows the catalog written through the other
        wait_for(lambda: all(served.get("/readyz").json()["catalog_size"] == len(MOVIES)
                             for _ in range(8)), 30, "the catalog in every worker")
        accepted = 0
        for n in range(30):
            slate = served.post("/v1/recommend", {"user_id": f"u{n % 5}", "k": 3})
            assert slate.status_code == 200, slate.text
            body = slate.json()
            assert len(body["items"]) == 3
            r = served.post("/v1/feedback", {"request_id": body["request_id"],
                                             "item_id": body["items"][0]["item_id"],
                                             "event": "click"})
            assert r.status_code == 202, r.text
            accepted += 1
        # learned once each, by the one worker holding the lease
        wait_for(lambda: served.get("/v1/model").json()["feedback_learned"] == accepted, 60,
                 "every click learned")
        assert all(served.get("/v1/model").json()["feedback_learned"] == accepted
                   for _ in range(6))
        holder = redis.Redis.from_url(server.url).get("recsvc:{model}:lease")
        assert holder is not None
        assert int(holder.decode().split("-")[-2]) in workers, (holder, workers)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0
        assert all(_gone(pid) for pid in workers)
        assert served.log.read_text().count("shutdown complete") == 2
    except BaseException:
        print(served.log.read_text()[-4000:])
        raise
    finally:
        served.kill_all()
        server.stop()


def test_workers_that_fail_to_start_stop_the_service_with_an_error(tmp_path):
    """A worker that cannot start (here: an encoder path that does not exist) would
    fail alike on every restart: the supervisor stops, and exits 3 as one process
    does, so that a restart policy sees a failure."""
    served = Served(tmp_path, {"RECSVC_REDIS_URL": "redis://127.0.0.1:1/0",
                               "RECSVC_ENCODER_PATH": str(tmp_path / "no-such-model")}, 2)
    try:
        assert served.proc.wait(120) == 3, served.log.read_text()[-3000:]
    finally:
        served.kill_all()


def test_workers_on_the_embedded_store_serve_from_one_process_and_say_so(tmp_path):
    served = Served(tmp_path, {}, 2)
    try:
        served.ready()
        assert not _children(served.proc.pid)
        assert "serving with one process, not 2" in served.log.read_text()
        assert served.get("/readyz").json()["status"] == "ready"
    finally:
        served.kill_all()


def test_workers_share_the_cores_among_their_torch_threads():
    """Each of N workers gives torch its share of the cores, so N processes do not each
    run a thread per core; one process keeps torch's default; a setting wins."""
    from models.device import TORCH_DEFAULT_THREADS, torch_threads_for

    assert torch_threads_for(0, 1) == TORCH_DEFAULT_THREADS
    assert torch_threads_for(0, 2) == max(1, TORCH_DEFAULT_THREADS // 2)
    assert torch_threads_for(0, 64) == 1  # never none
    assert torch_threads_for(3, 8) == 3


def test_every_compute_thread_runs_with_the_torch_threads_setting():
    """torch's thread count holds per thread (OpenMP's), so set once on the event
    loop's thread it would not reach the threads that run the model: each of the
    engine's pool threads sets RECSVC_TORCH_THREADS as it starts, and it holds through
    the model's work.
    (FAISS's searches set theirs around each search: tests/test_index.py.)"""
    import torch

    from app.metrics import Metrics
    from app.server.engine import Engine
    from app.settings import Settings
    from app.store.memory import MemoryStore
    from models.device import TORCH_DEFAULT_THREADS

    def after_model_work() -> int:
        torch.ones(64, 64) @ torch.ones(64, 64)
        return torch.get_num_threads()

    before = torch.get_num_threads()
    wanted = TORCH_DEFAULT_THREADS + 1  # not what a thread gets unless it sets it
    engine = Engine(Settings(torch_threads=wanted, compute_threads=2), MemoryStore(), Metrics())
    try:
        for pool in (engine.executor, engine.catalog_executor):
            got = {pool.submit(after_model_work).result() for _ in range(8)}
            assert got == {wanted}
    finally:
        engine.executor.shutdown()
        engine.catalog_executor.shutdown()
        torch.set_num_threads(before)
