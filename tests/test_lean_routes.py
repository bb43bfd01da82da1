"""``POST /v1/recommend`` and ``POST /v1/feedback`` answered without FastAPI's
per-request work in their common case (``app.server.lean_routes``): the answers must
be what FastAPI's routes give, and every other request must reach those routes with
its body intact, so that error bodies stay API.md's exactly."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.errors import APIError
from app.server.api import create_app
from app.server.lean_routes import LeanRoute
from app.settings import Settings
from app.store import StoreUnavailable
from tests.test_api import FAST, MOVIES


def _app(encoder, lean: bool, **overrides):
    app = create_app(Settings(**{**FAST, **overrides}), encoder=encoder)
    if not lean:  # FastAPI's routes alone: the reference
        app.router.routes[:] = [r for r in app.router.routes if not isinstance(r, LeanRoute)]
    return app


def _counting(app) -> dict[str, int]:
    """Wrap each LeanRoute's answer to count the requests it answered itself."""
    counts: dict[str, int] = {}
    for route in app.router.routes:
        if isinstance(route, LeanRoute):
            answer, path = route.answer, route.path

            async def counted(body, engine, answer=answer, path=path):
                try:
                    response = await answer(body, engine)
                except APIError:  # an answer of its own (404, 422 not in slate)
                    counts[path] = counts.get(path, 0) + 1
                    raise
                if response is not None:
                    counts[path] = counts.get(path, 0) + 1
                return response

            route.answer = counted
    return counts


def _answer(r) -> tuple[int, object, dict[str, str]]:
    """Status, body (without what differs run to run) and the headers that matter."""
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if isinstance(body, dict):
        for varies in ("request_id", "model_version", "items"):  # (items: their scores)
            body.pop(varies, None)
    headers = {k: r.headers.get(k) for k in ("content-type", "retry-after")}
    if not isinstance(body, dict) or "items" not in r.text:
        headers["content-length"] = r.headers.get("content-length")
    return r.status_code, body, headers


def _exchange(c: TestClient, slate_id: str, item: str) -> list[tuple[int, object, dict]]:
    """The status and body of requests of every kind, request ids left out."""
    def post(path, content, content_type="application/json"):
        return _answer(c.post(path, content=content, headers={"content-type": content_type}))

    fb = {"request_id": slate_id, "item_id": item, "event": "click"}
    return [
        post("/v1/feedback", json.dumps(fb)),
        post("/v1/feedback", json.dumps(fb)),  # a duplicate: 200
        post("/v1/feedback", json.dumps({**fb, "item_id": "nope"})),  # 422 not in slate
        post("/v1/feedback", json.dumps({**fb, "request_id": "unknown"})),  # 404
        post("/v1/feedback", json.dumps({**fb, "event": 3})),  # 422 validation
        post("/v1/feedback", json.dumps({**fb, "value": float("nan")})),  # NaN
        post("/v1/feedback", '{"request_id": "x", '),  # invalid JSON
        post("/v1/feedback", json.dumps(fb), content_type="text/plain"),
        post("/v1/feedback", json.dumps(["a list"])),
        post("/v1/feedback", b"\xff\xfe not utf-8"),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 0})),  # 422
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2, "extra": 1})),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2, "explain": "yes"})),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2})),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2, "explain": True})),
        post("/v1/recommend", "", content_type="application/json"),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2}),
             content_type="application/json; charset=utf-8"),
        post("/v1/recommend", json.dumps({"user_id": "u", "k": 2}),
             content_type="application/problem+json"),
        post("/v1/feedback", '{"request_id": "r", "item_id": "a", "event": "click", '
                             '"value": 1e400}'),
    ]


def _session(encoder, lean: bool, **overrides):
    app = _app(encoder, lean, **overrides)
    counts = _counting(app)
    with TestClient(app) as c:
        r = c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]},
                   headers={"x-api-key": "admin"} if overrides else {})
        assert r.status_code == 200, r.text
        headers = {"x-api-key": "key"} if overrides else {}
        c.headers.update(headers)
        slate = c.post("/v1/recommend", json={"user_id": "u-1", "k": 3}).json()
        item = slate["items"][0]["item_id"]
        return _exchange(c, slate["request_id"], item), counts


@pytest.mark.parametrize("keys", [False, True])
def test_lean_routes_answer_as_fastapi_does(encoder, keys):
    overrides = {"api_keys": "key", "admin_keys": "admin"} if keys else {}
    lean, counts = _session(encoder, True, **overrides)
    reference, _ = _session(encoder, False, **overrides)
    assert lean == reference
    # the common cases were answered by the lean path: the first slate, two feedback
    # events with a 2xx and two with an error of their own, two plain recommendations
    # (one with a charset in its content type)
    assert counts == {"/v1/recommend": 3, "/v1/feedback": 4}


def test_a_store_outage_answers_503_on_the_lean_path_as_on_fastapis(encoder):
    answers, counts = [], []
    for lean in (True, False):
        app = _app(encoder, lean)
        counts.append(_counting(app))
        with TestClient(app) as c:
            c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
            slate = c.post("/v1/recommend", json={"user_id": "u-1", "k": 3}).json()

            async def unavailable(*args, **kwargs):
                raise StoreUnavailable("connection lost")

            app.state.engine.store.impressions.feedback_on_slates = unavailable
            answers.append(_answer(c.post("/v1/feedback", json={
                "request_id": slate["request_id"], "item_id": slate["items"][0]["item_id"],
                "event": "click"})))
    assert answers[0] == answers[1]
    status, body, headers = answers[0]
    assert status == 503 and headers["retry-after"], answers[0]
    assert counts[0] == {"/v1/recommend": 1}  # the failed feedback raised through it


def test_the_latency_metric_is_labelled_by_the_route_on_both_paths(encoder):
    with TestClient(_app(encoder, True)) as c:
        c.post("/v1/recommend", json={"user_id": "u", "k": 2})  # lean
        c.post("/v1/recommend", json={"user_id": "u", "k": 0})  # FastAPI's: 422
        text = c.get("/metrics").text
    assert 'route="/v1/recommend",status="200"' in text
    assert 'route="/v1/recommend",status="422"' in text
    assert 'route="unmatched"' not in text
