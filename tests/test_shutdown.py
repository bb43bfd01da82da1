"""SIGTERM drains: a request in flight when the signal arrives still gets its answer,
and what the process holds (learning not yet published) is flushed before it exits."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from app.tools.client import wait_ready
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def start_server(redis_url: str, prefix: str, log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": prefix,
           "RECSVC_DEVICE": "cpu", "RECSVC_LEARNER_POLL_S": "0.05",
           # no version is due after the first within the test: only the flush publishes
           "RECSVC_PUBLISH_INTERVAL_S": "3600", "RECSVC_REWARD_WAIT_S": "3600"}
    log = open(log_path, "a")  # noqa: SIM115 - the child process writes to it
    proc = subprocess.Popen([sys.executable, "-m", "app.tools.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, lambda: proc.poll() is None, 90):
        proc.kill()
        raise RuntimeError(log_path.read_text())
    return proc, url


def test_sigterm_drains_in_flight_requests_and_flushes_learning(redis_url, redis_prefix,
                                                                 tmp_path):
    log_path = tmp_path / "serve.log"
    proc, url = start_server(redis_url, redis_prefix, log_path)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            first = [{"item_id": f"a-{n}", "text": f"Film number {n}. Drama"} for n in range(20)]
            assert c.post("/v1/items", json={"items": first}).status_code == 200
            accepted = 0
            for n in range(4):
                slate = c.post("/v1/recommend", json={"user_id": f"u{n}", "k": 3}).json()
                r = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                 "item_id": slate["items"][0]["item_id"],
                                                 "event": "click"})
                assert r.status_code == 202
                accepted += 1
                if n == 0:  # the first version is published at once; later ones are not due
                    deadline = time.time() + 10
                    while c.get("/v1/model").json()["version"] < 1:
                        assert time.time() < deadline
                        time.sleep(0.05)
            time.sleep(1.0)  # the learner reads and learns the later clicks meanwhile
            # learned, not committed: the counters are written with the version that holds
            # the learning, and no version is due
            model = c.get("/v1/model").json()
            assert (model["version"], model["feedback_learned"]) == (1, 1), model

            # a slow request (embedding 600 new texts) is in flight when SIGTERM arrives
            big = [{"item_id": f"b-{n}", "text": f"A long description of film {n}. " * 8}
                   for n in range(600)]
            answer: dict = {}

            def upload():
                try:
                    answer["r"] = c.post("/v1/items", json={"items": big})
                except httpx.HTTPError as exc:
                    answer["error"] = exc

            worker = threading.Thread(target=upload)
            worker.start()
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            worker.join(60)
            assert "error" not in answer, answer.get("error")
            assert answer["r"].status_code == 200, answer["r"].text
            assert answer["r"].json()["catalog_size"] == 620
        proc.wait(60)
        output = log_path.read_text()
        assert proc.returncode in (0, -signal.SIGTERM), output
        assert "shutdown complete" in output, output
        assert "committed version 2 at shutdown" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()

    proc, url = start_server(redis_url, redis_prefix, log_path)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/readyz").json()["catalog_size"] == 620
            model = c.get("/v1/model").json()
            # the learning since version 1 was published at shutdown, not lost
            assert model["version"] == 2, model
            assert model["feedback_learned"] == accepted
    finally:
        proc.terminate()
        proc.wait(30)
