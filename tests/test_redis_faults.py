"""Redis replies that mean "unavailable" take the degraded path, never a 500.

Out of memory (``maxmemory`` reached with ``noeviction``), read-only (a replica after a
failover), loading: recommend keeps answering from memory and holds the impressions it
served, feedback and events answer 503 with ``Retry-After`` and API.md's error body,
the rate limit lets requests through, and readiness stays 200 with the store's
health in its body. At 3b796b0 each of these was a plain-text 500.
"""

import subprocess
import time

import pytest
import redis
from fastapi.testclient import TestClient

from app.server.api import create_app
from app.settings import Settings
from app.store import StoreUnavailable
from tests.conftest import RedisServer
from tests.test_api import FAST, MOVIES, assert_error


@pytest.fixture
def server():
    s = RedisServer()
    yield s
    s.stop()


def _client(server, encoder, **extra):
    settings = Settings(**{**FAST, "redis_url": server.url, "key_prefix": "faults", **extra})
    return TestClient(create_app(settings, encoder=encoder))


def _degraded(c, before):
    """What a client sees while the store refuses writes."""
    r = c.post("/v1/recommend", json={"user_id": "u", "k": 3, "context": {"text": "kids"}})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    fresh = c.post("/v1/recommend", json={"user_id": "u", "k": 3,
                                          "context": {"text": "a context never seen"}})
    assert fresh.status_code == 200
    fb = c.post("/v1/feedback", json={"request_id": before["request_id"],
                                      "item_id": before["items"][0]["item_id"],
                                      "event": "click"})
    assert_error(fb, 503, "store_unavailable")
    assert fb.headers["retry-after"]
    ev = c.post("/v1/events", json={"user_id": "u", "item_id": "m-1", "event": "click"})
    assert_error(ev, 503, "store_unavailable")
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "unavailable"
    return r.json(), fresh.json()


def test_out_of_memory_is_unavailable_not_a_server_error(server, encoder):
    with _client(server, encoder) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        before = c.post("/v1/recommend", json={"user_id": "u", "k": 3}).json()
        r = redis.Redis.from_url(server.url)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        served, fresh = _degraded(c, before)
        r.config_set("maxmemory", "0")
        # the slates served meanwhile were held and are logged once writes succeed
        deadline = time.time() + 10
        for slate in (served, fresh):
            while True:
                fb = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                  "item_id": slate["items"][0]["item_id"],
                                                  "event": "click"})
                if fb.status_code == 202:
                    break
                assert time.time() < deadline, fb.text
                time.sleep(0.1)
        assert c.get("/readyz").json()["store"] == "ok"


@pytest.mark.parametrize("refusal", [("min-replicas-to-write", "1", "0"),  # NOREPLICAS
                                     ("stop-writes-on-bgsave-error", None, None)])
def test_writes_refused_for_want_of_replicas_or_a_failed_save_are_unavailable(
        server, encoder, refusal):
    """NOREPLICAS (``min-replicas-to-write``) and MISCONF (a failed RDB save, as on a
    full disk) refuse writes with plain error replies: they are outages too."""
    name, on, off = refusal
    with _client(server, encoder) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        before = c.post("/v1/recommend", json={"user_id": "u", "k": 3}).json()
        if name == "min-replicas-to-write":
            r = redis.Redis.from_url(server.url)
            r.config_set(name, on)
            try:
                _degraded(c, before)
            finally:
                r.config_set(name, off)
        else:  # no RDB save can fail on demand here: the reply is injected
            refused = redis.exceptions.ResponseError(
                "MISCONF Redis is configured to save RDB snapshots, but it's currently "
                "unable to persist to disk.")
            store = c.app.state.engine.store
            original = store.r.execute_command

            async def misconf(*args, **kwargs):
                raise refused
            store.r.execute_command = misconf
            try:
                with pytest.raises(StoreUnavailable):
                    c.portal.call(store.check_writable)
            finally:
                store.r.execute_command = original
        assert c.get("/readyz").json()["store"] == "ok"


def test_a_failover_to_read_only_is_unavailable_and_reconnects(server, encoder):
    primary = RedisServer()
    try:
        with _client(server, encoder) as c:
            c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                for i, t in MOVIES]})
            before = c.post("/v1/recommend", json={"user_id": "u", "k": 3}).json()
            # the server becomes a replica of another: it answers READONLY to writes
            subprocess.run(["redis-cli", "-p", str(server.port), "replicaof", "127.0.0.1",
                            str(primary.port)], check=True, capture_output=True)
            _degraded(c, before)
            subprocess.run(["redis-cli", "-p", str(server.port), "replicaof", "no", "one"],
                           check=True, capture_output=True)
            deadline = time.time() + 10
            while c.get("/readyz").json()["store"] != "ok":
                assert time.time() < deadline
                time.sleep(0.1)
    finally:
        primary.stop()


def test_the_rate_limit_lets_requests_through_when_the_store_refuses_writes(server, encoder):
    with _client(server, encoder, rate_limit=100) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        r = redis.Redis.from_url(server.url)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        try:
            got = c.post("/v1/recommend", json={"user_id": "u", "k": 3})
            assert got.status_code == 200
            assert c.get("/v1/items/m-1").status_code == 200
        finally:
            r.config_set("maxmemory", "0")


def test_an_unexpected_error_gets_the_error_body(encoder, monkeypatch):
    settings = Settings(**FAST)
    with TestClient(create_app(settings, encoder=encoder), raise_server_exceptions=False) as c:
        engine = c.app.state.engine

        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(engine, "recommend", broken)
        assert_error(c.post("/v1/recommend", json={"user_id": "u"}), 500, "internal")
