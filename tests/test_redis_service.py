"""Service behaviour that only Redis can show: restarts keep the catalog and the model
without re-embedding, and an outage degrades the way DESIGN.md says."""

import time

from fastapi.testclient import TestClient

from app.api import create_app
from app.settings import Settings
from tests.conftest import RedisServer
from tests.test_api import FAST, MOVIES, assert_error


class CountingEncoder:
    """The real encoder, counting how many texts it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0
        self.dim, self.model_id = inner.dim, inner.model_id

    def encode(self, texts):
        self.texts += len(texts)
        return self.inner.encode(texts)


def test_restart_reembeds_nothing_and_resumes_the_model(redis_url, redis_prefix, encoder):
    settings = Settings(**FAST, redis_url=redis_url, key_prefix=redis_prefix)
    first = CountingEncoder(encoder)
    with TestClient(create_app(settings, encoder=first)) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        assert first.texts == len(MOVIES)
        # re-upserting unchanged text does not re-embed either
        c.post("/v1/items", json={"items": [{"item_id": "m-1", "text": MOVIES[0][1]}]})
        assert first.texts == len(MOVIES)
        slate = c.post("/v1/recommend", json={"user_id": "u", "k": 3}).json()
        c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                     "item_id": slate["items"][0]["item_id"],
                                     "event": "click"})
        deadline = time.time() + 10
        while c.get("/v1/model").json()["version"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        version = c.get("/v1/model").json()["version"]
        assert version >= 1
    second = CountingEncoder(encoder)
    with TestClient(create_app(settings, encoder=second)) as c:
        assert c.get("/readyz").json()["catalog_size"] == len(MOVIES)
        assert second.texts == 0
        slate = c.post("/v1/recommend", json={"user_id": "u2", "k": 10}).json()
        assert slate["model_version"] >= version and len(slate["items"]) == 10
        assert c.get("/v1/model").json()["feedback_learned"] == 1


def test_redis_outage_degrades_and_recovers(encoder):
    """Redis dies mid-run: recommend keeps answering from memory, writes answer 503
    (never 202 for an event that was not stored); when Redis is back the service
    recovers by itself within 15 s, and slates served during the outage can still
    get feedback that is learned."""
    server = RedisServer(persistent=True)
    try:
        settings = Settings(**FAST, redis_url=server.url, key_prefix="outage")
        with TestClient(create_app(settings, encoder=encoder)) as c:
            c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
            before = c.post("/v1/recommend", json={"user_id": "u", "k": 3,
                                                   "context": {"text": "kids"}}).json()
            server.kill()
            assert_error(c.get("/readyz"), 503)
            fb = c.post("/v1/feedback", json={"request_id": before["request_id"],
                                              "item_id": before["items"][0]["item_id"],
                                              "event": "click"})
            assert_error(fb, 503)
            assert fb.headers["retry-after"]
            ev = c.post("/v1/events", json={"user_id": "u", "item_id": "m-1",
                                             "event": "click"})
            assert_error(ev, 503)
            assert ev.headers["retry-after"]
            # recommend keeps answering from memory, with a context-only state
            r = c.post("/v1/recommend", json={"user_id": "u", "k": 3,
                                              "context": {"text": "kids"}})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
            during = c.post("/v1/recommend", json={"user_id": "u", "k": 3,
                                                   "context": {"text": "a text never seen"}})
            assert during.status_code == 200
            during = during.json()

            server.start()
            back = time.time()
            while c.get("/readyz").status_code != 200:
                assert time.time() - back < 15, "not ready 15 s after Redis came back"
                time.sleep(0.1)
            # the slate served while Redis was down was logged once it came back
            for slate in (before, during):
                ok = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                  "item_id": slate["items"][0]["item_id"],
                                                  "event": "click"})
                assert ok.status_code == 202, ok.text
            assert c.post("/v1/events", json={"user_id": "u", "item_id": "m-1",
                                              "event": "click"}).status_code == 202
            deadline = time.time() + 15
            while c.get("/v1/model").json()["feedback_learned"] < 2:
                assert time.time() < deadline, c.get("/v1/model").json()
                time.sleep(0.1)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.stop()
