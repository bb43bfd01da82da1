"""The production topology on one machine: 2 API replicas, 2 learners, a private Redis.

Feedback goes through both replicas, the learner holding the lease is SIGKILLed
mid-run, traffic continues. Every accepted feedback event must be learned exactly
once, both replicas must serve the same newer version, and catalog changes made
through one replica must reach the other's index.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.tools.processes import stop
from tests.conftest import RedisServer, free_port, wait_port
from tests.test_api import MOVIES, wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "RECSVC_ROLE": "api",
    "RECSVC_REWARD_WAIT_S": "1",
    "RECSVC_LEARNER_POLL_S": "0.05",
    "RECSVC_PUBLISH_INTERVAL_S": "0.3",
    "RECSVC_WEIGHTS_POLL_S": "0.2",
    "RECSVC_LEASE_TTL_S": "3",
    "RECSVC_REPLAY_SIZE": "5000",
    "RECSVC_REPLAY_PREFAULT": "false",
    "RECSVC_SEED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class Process:
    """A ``recsvc`` command on a free port, with its log kept for a failing test."""

    def __init__(self, command: str, redis_url: str, logs: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        env = {**os.environ, **ENV, "RECSVC_REDIS_URL": redis_url}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.tools.cli", command, "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> None:
        wait_port(self.port, timeout=120, alive=lambda: self.proc.poll() is None)
        wait_for(lambda: self.get("/readyz").status_code == 200, 60, f"{self.log.name} ready")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop(self.proc, grace_s=30)


@pytest.fixture
def topology(tmp_path):
    redis = RedisServer()
    procs = {name: Process(cmd, redis.url, tmp_path, name)
             for name, cmd in (("api-a", "serve"), ("api-b", "serve"),
                               ("learner-1", "learner"), ("learner-2", "learner"))}
    try:
        for p in procs.values():
            p.ready()
        yield procs
    except BaseException:
        for p in procs.values():
            print(f"--- {p.log.name}\n{p.log.read_text()[-3000:]}")
        raise
    finally:
        for p in procs.values():
            p.stop()
        redis.stop()


def _traffic(replicas: list[Process], users: range, tag: str) -> tuple[int, list[str]]:
    """A slate per user, alternating replicas, and a click on one item of each (through
    the other replica); every third slate also gets a purchase. Returns the count of
    accepted feedback events and the request ids."""
    accepted, request_ids = 0, []
    for n in users:
        serve, answer = replicas[n % 2], replicas[(n + 1) % 2]
        slate = serve.post("/v1/recommend", {"user_id": f"{tag}-{n % 7}", "k": 3,
                                             "context": {"text": "a film for tonight"}})
        assert slate.status_code == 200, slate.text
        body = slate.json()
        request_ids.append(body["request_id"])
        events = ["click"] + (["purchase"] if n % 3 == 0 else [])
        for event in events:
            r = answer.post("/v1/feedback", {"request_id": body["request_id"],
                                             "item_id": body["items"][n % 3]["item_id"],
                                             "event": event})
            assert r.status_code == 202, r.text
            accepted += 1
        # a retry of the click is a duplicate: never learned twice
        again = serve.post("/v1/feedback", {"request_id": body["request_id"],
                                            "item_id": body["items"][n % 3]["item_id"],
                                            "event": "click"})
        assert again.status_code == 200 and again.json()["duplicate"] is True
    return accepted, request_ids


def test_learner_failover_learns_every_event_exactly_once(topology):
    a, b = topology["api-a"], topology["api-b"]
    learners = [topology["learner-1"], topology["learner-2"]]
    r = a.post("/v1/items", {"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
    assert r.status_code == 200
    wait_for(lambda: b.get("/readyz").json()["catalog_size"] == len(MOVIES), 10,
             "the catalog to reach replica b")

    accepted, request_ids = _traffic([a, b], range(24), "before")
    active = wait_for(lambda: [p for p in learners if p.get("/status").json()["active"]], 10,
                      "a learner holding the lease")
    assert len(active) == 1
    holder = active[0]
    standby = learners[1 - learners.index(holder)]
    version_before = a.get("/v1/model").json()["version"]
    holder.proc.send_signal(signal.SIGKILL)  # mid-run: reward windows open, learning uncommitted
    holder.proc.wait(5)

    more, more_ids = _traffic([a, b], range(24, 48), "after")
    accepted += more
    request_ids += more_ids

    def learned_all():
        models = [p.get("/v1/model").json() for p in (a, b)]
        assert all(m["feedback_learned"] <= accepted for m in models), (models, accepted)
        return all(m["feedback_learned"] == accepted and m["pending_impressions"] == 0
                   for m in models) and models

    wait_for(learned_all, 60, f"{accepted} feedback events learned")
    status = standby.get("/status").json()
    assert status["active"] is True and status["takeovers"] == 1
    assert status["lease_holder"] == status["consumer"]
    # the learner's counts are Prometheus counters (_total), beside the process metrics
    text = standby.get("/metrics").text
    assert "recsvc_learner_takeovers_total 1.0" in text
    assert "# TYPE recsvc_learner_updates_total counter" in text
    learned = [line for line in text.splitlines()
               if line.startswith("recsvc_learner_feedback_learned_total ")]
    assert len(learned) == 1 and float(learned[0].split()[1]) > 0
    assert "recsvc_learner_active 1.0" in text and "process_resident_memory_bytes" in text
    assert status["claimed"] > 0  # the dead holder's uncommitted entries were taken over
    # both replicas serve the same, newer version
    versions = wait_for(lambda: len(v := {p.get("/v1/model").json()["version"]
                                          for p in (a, b)}) == 1 and v, 5,
                        "both replicas on one version")
    assert versions.pop() > version_before
    # every slate closed and logged once, with its rewards
    log = a.get("/v1/log").json()["records"]
    assert sorted(rec["request_id"] for rec in log) == sorted(request_ids)
    assert sum(sum(rec["rewards"]) > 0 for rec in log) == len(request_ids)

    # a catalog change through one replica reaches the other's index
    new = {"item_id": "m-new", "text": "Brand New Film (2026). Documentary"}
    assert a.post("/v1/items", {"items": [new]}).status_code == 200

    def recommended_by_b(item_id: str) -> bool:
        slate = b.post("/v1/recommend", {"user_id": "fresh-user", "k": len(MOVIES) + 1,
                                         "explore": False}).json()
        return item_id in {i["item_id"] for i in slate["items"]}

    wait_for(lambda: recommended_by_b("m-new"), 5, "replica b to recommend the new item")
    assert httpx.delete(f"{b.url}/v1/items/m-1", timeout=10).status_code == 204
    wait_for(lambda: a.get("/readyz").json()["catalog_size"] == len(MOVIES), 5,
             "the deletion to reach replica a")
    slate = a.post("/v1/recommend", {"user_id": "fresh-user-2", "k": len(MOVIES) + 1}).json()
    assert "m-1" not in {i["item_id"] for i in slate["items"]}
    # deleting a user through one replica erases them for the other
    assert httpx.delete(f"{a.url}/v1/users/before-1", timeout=10).status_code == 204
    assert b.get("/v1/users/before-1").json()["history"] == []
