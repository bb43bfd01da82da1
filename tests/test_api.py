"""The HTTP contract of API.md, in-process, against both store backends."""

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.server.api import create_app
from app.settings import Settings

FAST = dict(reward_wait_s=0.3, learner_poll_s=0.05, publish_interval_s=0.1,
            weights_poll_s=0.1, seed=0)

MOVIES = [
    ("m-1", "Toy Story (1995). Animation, Children's, Comedy"),
    ("m-2", "GoldenEye (1995). Action, Adventure, Thriller"),
    ("m-3", "Heat (1995). Action, Crime, Thriller"),
    ("m-4", "Sense and Sensibility (1995). Drama, Romance"),
    ("m-5", "Babe (1995). Children's, Comedy, Drama"),
    ("m-6", "Seven (1995). Crime, Thriller"),
    ("m-7", "Apollo 13 (1995). Action, Drama, Thriller"),
    ("m-8", "Casablanca (1942). Drama, Romance, War"),
    ("m-9", "Aladdin (1992). Animation, Children's, Comedy, Musical"),
    ("m-10", "Alien (1979). Action, Horror, Sci-Fi, Thriller"),
]


def make_client(backend, encoder, **overrides) -> TestClient:
    _, cfg = backend
    settings = Settings(**{**FAST, **cfg, **overrides})
    return TestClient(create_app(settings, encoder=encoder))


@pytest.fixture
def client(backend, encoder):
    with make_client(backend, encoder) as c:
        r = c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        assert r.status_code == 200
        yield c


def assert_error(resp, status: int, code: str | None = None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def recommend(c, user="u-1", **kw):
    body = {"user_id": user, "context": {"text": "family evening, kids"}, **kw}
    r = c.post("/v1/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s")


# -- operations ----------------------------------------------------------------------------
def test_health_ready_metrics_docs(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["catalog_size"] == 10
    recommend(client)
    recommend(client)  # same context: served from the embedding cache
    text = client.get("/metrics").text
    for name in ("recsvc_http_request_duration_seconds_bucket", "recsvc_recommendations_total",
                 "recsvc_explored_fraction", "recsvc_feedback_reward_total",
                 "recsvc_learner_updates_total", "recsvc_model_version",
                 "recsvc_encoder_cache_hit_ratio",
                 # the standard collectors, as on the default registry
                 "process_resident_memory_bytes", "python_info",
                 "python_gc_objects_collected_total"):
        assert name in text
    # a count that only grows is a counter named _total, whoever keeps it
    types = dict(line.split()[2:4] for line in text.splitlines()
                 if line.startswith("# TYPE recsvc_"))
    assert types["recsvc_learner_updates_total"] == "counter"
    assert all(kind != "gauge" or not name.endswith("_total") for name, kind in types.items())
    assert 'route="/v1/recommend"' in text
    assert "recsvc_encoder_cache_hits_total 1.0" in text
    page = client.get("/docs")
    assert page.status_code == 200
    # offline: every asset of the page comes from the service itself
    assert "cdn" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page.text
        got = client.get(f"/docs-assets/{asset}")
        assert got.status_code == 200 and len(got.content) > 10_000
    assert client.get("/openapi.json").json()["info"]["version"] == "1.1"
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]


def test_the_openapi_document_declares_the_api_key():
    """Swagger UI's Authorize button: the X-API-Key scheme, on every /v1 operation and
    on no probe."""
    doc = create_app(Settings()).openapi()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": doc["components"]["securitySchemes"]["ApiKey"]["description"]}
    for path, operations in doc["paths"].items():
        for op in operations.values():
            assert (op.get("security") == [{"ApiKey": []}]) == path.startswith("/v1/"), path


def test_every_response_carries_its_request_id_and_the_access_log_names_it(client):
    """X-Request-ID: a client's sane id comes back as sent, anything else is replaced
    by a new one; the access log's JSON line carries the same id, route and status."""
    import io
    import json
    import logging

    from app.logs import handler

    stream = io.StringIO()
    access = logging.getLogger("recsvc.access")
    access.addHandler(out := handler("json", stream))
    access.setLevel(logging.INFO)
    try:
        given = client.get("/v1/items/m-1", headers={"X-Request-ID": "trace-42.a:b"})
        forged = client.get("/v1/items/nope", headers={"X-Request-ID": "\"} FAKE {\""})
        made_up = client.get("/v1/popular")
    finally:
        access.removeHandler(out)
        access.setLevel(logging.NOTSET)
    assert given.headers["x-request-id"] == "trace-42.a:b"
    assert forged.status_code == 404 and "FAKE" not in forged.headers["x-request-id"]
    assert len(made_up.headers["x-request-id"]) == 26  # a ULID
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["request_id"], x["route"], x["status"]) for x in lines] == [
        ("trace-42.a:b", "/v1/items/{item_id}", 200),
        (forged.headers["x-request-id"], "/v1/items/{item_id}", 404),
        (made_up.headers["x-request-id"], "/v1/popular", 200)]
    assert all(x["logger"] == "recsvc.access" and x["duration_ms"] >= 0 for x in lines)


# -- catalog -------------------------------------------------------------------------------
def test_item_crud(client):
    r = client.post("/v1/items", json={"items": [
        {"item_id": "new-1", "text": "A new documentary", "tags": ["doc"]}]})
    assert r.json() == {"upserted": 1, "catalog_size": 11}
    assert client.get("/v1/items/new-1").json() == {
        "item_id": "new-1", "text": "A new documentary", "tags": ["doc"], "available": True}
    assert client.delete("/v1/items/new-1").status_code == 204
    assert_error(client.get("/v1/items/new-1"), 404)
    assert_error(client.delete("/v1/items/new-1"), 404)


@pytest.mark.parametrize("items,field", [
    ([{"item_id": "bad id!", "text": "x"}], "items.0.item_id"),
    ([{"item_id": "ok", "text": ""}], "items.0.text"),
    ([{"item_id": "ok", "text": "x" * 4001}], "items.0.text"),
    ([{"item_id": "ok"}], "items.0.text"),
    ([{"item_id": f"i{n}", "text": "x"} for n in range(1001)], "items"),
    ([], "items"),
])
def test_invalid_items_are_rejected_and_nothing_is_written(client, items, field):
    err = assert_error(client.post("/v1/items", json={"items": items}), 422, "validation_error")
    assert err["message"].startswith(field)
    assert client.get("/readyz").json()["catalog_size"] == 10


def test_new_item_is_recommendable_at_once_and_unavailable_never(client):
    client.post("/v1/items", json={"items": [
        {"item_id": "fresh", "text": "Toy Story 2 (1999). Animation, Children's, Comedy"},
        {"item_id": "hidden", "text": "Toy Story 3 (2010). Animation, Children's, Comedy",
         "available": False}]})
    slate = recommend(client, k=100, explore=False)
    ids = [i["item_id"] for i in slate["items"]]
    assert "fresh" in ids and "hidden" not in ids
    assert len(ids) == 11
    # flipping availability back makes it recommendable, without re-embedding
    client.post("/v1/items", json={"items": [
        {"item_id": "hidden", "text": "Toy Story 3 (2010). Animation, Children's, Comedy"}]})
    assert "hidden" in [i["item_id"] for i in recommend(client, k=100)["items"]]


# -- recommending -----------------------------------------------------------------------------
def test_slate_shape_and_propensities(client):
    slate = recommend(client, k=4)
    assert set(slate) == {"request_id", "model_version", "items"}
    assert len(slate["request_id"]) == 26 and slate["request_id"].startswith("0")
    items = slate["items"]
    assert len(items) == 4 and len({i["item_id"] for i in items}) == 4
    for it in items:
        assert set(it) == {"item_id", "score", "explored", "propensity"}
        assert 0 < it["propensity"] <= 1
    greedy = recommend(client, user="u-2", k=3, explore=False)["items"]
    assert all(i["propensity"] == 1.0 and not i["explored"] for i in greedy)
    scores = [i["score"] for i in greedy]
    assert scores == sorted(scores, reverse=True)


def test_context_drives_the_untrained_ranking(client):
    kids = recommend(client, user="a", explore=False, k=3,
                     context={"text": "animated cartoon for children"})["items"]
    assert {i["item_id"] for i in kids} & {"m-1", "m-9", "m-5"}


def test_exclude_candidates_and_k_larger_than_catalog(client):
    slate = recommend(client, k=100, exclude=["m-1", "m-2"])
    ids = {i["item_id"] for i in slate["items"]}
    assert len(ids) == 8 and not ids & {"m-1", "m-2"}
    only = recommend(client, k=10, candidates=["m-3", "m-4", "unknown-item", "m-3"])
    assert sorted(i["item_id"] for i in only["items"]) == ["m-3", "m-4"]


@pytest.mark.parametrize("body,field", [
    ({"user_id": "u", "k": 0}, "k"),
    ({"user_id": "u", "k": 101}, "k"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u" * 129}, "user_id"),
    ({"k": 3}, "user_id"),
    ({"user_id": "u", "context": {"text": "x" * 4001}}, "context.text"),
    ({"user_id": "u", "candidates": ["c"] * 1001}, "candidates"),
    ({"user_id": "u", "explore": "sometimes"}, "explore"),
])
def test_invalid_recommend_requests(client, body, field):
    err = assert_error(client.post("/v1/recommend", json=body), 422, "validation_error")
    assert err["message"].startswith(field)
    assert err["details"][0]["field"] == field


def test_malformed_json_is_422(client):
    r = client.post("/v1/recommend", content=b"{not json", headers={"content-type":
                                                                  "application/json"})
    assert_error(r, 422, "validation_error")


# -- feedback and events --------------------------------------------------------------------
def test_feedback_contract(client):
    slate = recommend(client, k=3)
    rid, item = slate["request_id"], slate["items"][0]["item_id"]
    fb = {"request_id": rid, "item_id": item, "event": "click"}
    r = client.post("/v1/feedback", json=fb)
    assert r.status_code == 202 and r.json()["accepted"] is True and r.json()["reward"] == 1.0
    dup = client.post("/v1/feedback", json=fb)
    assert dup.status_code == 200 and dup.json()["duplicate"] is True
    assert client.post("/v1/feedback", json={**fb, "event": "purchase"}).status_code == 202
    rating = client.post("/v1/feedback", json={**fb, "event": "rating", "value": 5})
    assert rating.status_code == 202 and rating.json()["reward"] == 1.0
    assert_error(client.post("/v1/feedback", json={**fb, "request_id": "01NOPE"}), 404,
                 "unknown_request")
    err = assert_error(client.post("/v1/feedback", json={**fb, "item_id": "m-404"}), 422,
                       "item_not_in_slate")
    assert "item_id" in err["message"]
    assert_error(client.post("/v1/feedback", json={**fb, "event": "rating"}), 422)
    assert_error(client.post("/v1/feedback", json={**fb, "event": "dwell", "value": -1}), 422)
    assert_error(client.post("/v1/feedback", json={**fb, "event": "teleport"}), 422)
    history = client.get("/v1/users/u-1").json()
    assert history["user_id"] == "u-1"
    assert [(h["item_id"], h["event"]) for h in history["history"]] == [
        (item, "click"), (item, "purchase"), (item, "rating")]


def test_feedback_is_seen_by_the_next_request(client):
    slate = recommend(client, k=10, explore=False)
    first = slate["items"][0]["item_id"]
    client.post("/v1/feedback", json={"request_id": slate["request_id"], "item_id": first,
                                      "event": "click"})
    again = recommend(client, k=10, explore=False)
    assert first not in [i["item_id"] for i in again["items"]]  # exclude_seen
    keep = recommend(client, k=10, explore=False, exclude_seen=False)
    assert first in [i["item_id"] for i in keep["items"]]


@pytest.fixture
def resting_client(backend, encoder):
    """A service that always rests passed-over items, as without the ensemble; with it,
    resting waits until the logistic agent learns that re-shown items are passed over
    again (tests/test_ensemble.py)."""
    with make_client(backend, encoder, ensemble=False) as c:
        r = c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        assert r.status_code == 200
        yield c


def test_items_a_user_ignored_rest_unless_the_slate_would_be_short(resting_client):
    client = resting_client
    first = recommend(client, k=3, explore=False)
    ignored = [i["item_id"] for i in first["items"]]
    others = [m for m, _ in MOVIES if m not in ignored][:3]
    again = recommend(client, k=3, explore=False, candidates=ignored + others)
    assert sorted(i["item_id"] for i in again["items"]) == sorted(others)
    short = recommend(client, k=3, explore=False, candidates=ignored + others[:1])
    assert len(short["items"]) == 3  # too few fresh items: ignored ones come back

    # an item the user acted on does not rest
    slate = recommend(client, user="u-2", k=3, explore=False)
    shown = [i["item_id"] for i in slate["items"]]
    fresh = [m for m, _ in MOVIES if m not in shown][:2]
    r = client.post("/v1/feedback", json={"request_id": slate["request_id"],
                                          "item_id": shown[0], "event": "click"})
    assert r.status_code == 202
    after = recommend(client, user="u-2", k=3, explore=False, exclude_seen=False,
                      candidates=shown + fresh)
    assert sorted(i["item_id"] for i in after["items"]) == sorted([shown[0], *fresh])


def test_batch_feedback_answers_each_event_as_it_would_be_alone(client):
    """v1.1: one call, one result per event in order; a refused event does not refuse
    the others."""
    slate = recommend(client, k=3)
    rid, items = slate["request_id"], [i["item_id"] for i in slate["items"]]
    other = [m for m, _ in MOVIES if m not in items][0]
    events = [{"request_id": rid, "item_id": items[0], "event": "click"},
              {"request_id": rid, "item_id": items[0], "event": "click"},   # repeated
              {"request_id": "01UNKNOWN", "item_id": items[1], "event": "click"},
              {"request_id": rid, "item_id": other, "event": "click"},      # not shown
              {"request_id": rid, "item_id": items[1], "event": "rating"},  # no value
              {"request_id": rid, "item_id": items[2], "event": "rating", "value": 4}]
    r = client.post("/v1/feedback/batch", json={"events": events})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [202, 200, 404, 422, 422, 202]
    assert results[0] == {"status": 202, "accepted": True, "reward": 1.0, "duplicate": False}
    assert results[1]["duplicate"] is True
    assert results[2]["error"]["code"] == "unknown_request"
    assert results[3]["error"]["code"] == "item_not_in_slate"
    assert results[4]["error"]["code"] == "validation_error"
    history = client.get("/v1/users/u-1").json()["history"]
    assert [(h["item_id"], h["event"]) for h in history] == [(items[0], "click"),
                                                             (items[2], "rating")]
    # the same event alone is now a duplicate
    alone = client.post("/v1/feedback", json=events[0])
    assert alone.status_code == 200 and alone.json()["duplicate"] is True
    assert_error(client.post("/v1/feedback/batch", json={"events": []}), 422)
    assert_error(client.post("/v1/feedback/batch", json={"events": [{}] * 1001}), 422)


def test_similar_and_popular(client):
    """v1.1 catalog reads: nearest available items by content, and items by engagement."""
    sim = client.get("/v1/items/m-1/similar", params={"k": 3})
    assert sim.status_code == 200
    items = sim.json()["items"]
    assert len(items) == 3 and "m-1" not in [i["item_id"] for i in items]
    # Toy Story's nearest: the two other children's comedies, Babe and Aladdin
    assert {i["item_id"] for i in items[:2]} == {"m-5", "m-9"}, items
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True) and all(-1 <= v <= 1 for v in scores)
    assert_error(client.get("/v1/items/m-404/similar"), 404, "item_not_found")
    assert_error(client.get("/v1/items/m-1/similar", params={"k": 0}), 422)
    assert client.delete("/v1/items/m-9").status_code == 204  # only available items
    assert "m-9" not in [i["item_id"] for i in
                         client.get("/v1/items/m-1/similar").json()["items"]]

    for _ in range(3):  # m-5 is shown and clicked; the rest of each slate is passed over
        slate = recommend(client, user="pop", k=5, candidates=["m-5", "m-2", "m-3", "m-4",
                                                              "m-6"], explore=False,
                          exclude_seen=False)
        assert client.post("/v1/feedback", json={"request_id": slate["request_id"],
                                                  "item_id": "m-5", "event": "click"}
                           ).status_code == 202
    top = wait_for(lambda: (r := client.get("/v1/popular", params={"k": 4}).json()["items"])
                   and r[0]["item_id"] == "m-5" and r, what="m-5 first")
    assert len(top) == 4 and top[0]["score"] > top[1]["score"]


def test_events_endpoint(client):
    r = client.post("/v1/events", json={"user_id": "u-9", "item_id": "m-3",
                                        "event": "purchase", "value": None})
    assert r.status_code == 202 and r.json() == {"accepted": True}
    assert client.get("/v1/users/u-9").json()["history"][0]["item_id"] == "m-3"
    assert_error(client.post("/v1/events", json={"user_id": "u-9", "item_id": "nope",
                                                 "event": "click"}), 404)
    assert_error(client.post("/v1/events", json={"user_id": "u-9", "item_id": "m-3",
                                                 "event": "dwell"}), 422)
    ids = [i["item_id"] for i in recommend(client, user="u-9", k=10)["items"]]
    assert "m-3" not in ids


def test_delete_user_erases_everything(client):
    slate = recommend(client, user="bye", k=2)
    client.post("/v1/events", json={"user_id": "bye", "item_id": "m-3", "event": "click"})
    assert client.delete("/v1/users/bye").status_code == 204
    assert client.get("/v1/users/bye").json() == {"user_id": "bye", "history": []}
    assert_error(client.post("/v1/feedback", json={
        "request_id": slate["request_id"], "item_id": slate["items"][0]["item_id"],
        "event": "click"}), 404, "unknown_request")
    assert client.delete("/v1/users/never-seen").status_code == 204


# -- learning -------------------------------------------------------------------------------
def test_feedback_moves_the_model_and_the_policy(client):
    """Always clicking the item the untrained policy ranks last makes it rise to the top."""
    ctx = {"text": "family evening, kids"}
    start = client.get("/v1/model").json()
    assert set(start) == {"version", "updates", "feedback_learned", "epsilon",
                          "pending_impressions", "device"}
    assert start["device"] == "cpu" and start["version"] == 0
    initial = recommend(client, user="probe", context=ctx, k=10, explore=False,
                        exclude_seen=False)["items"]
    target = initial[-1]["item_id"]
    accepted = 0
    for n in range(120):
        slate = recommend(client, user=f"learner-{n % 7}", context=ctx, k=10,
                          exclude_seen=False)
        shown = [i["item_id"] for i in slate["items"]]
        r = client.post("/v1/feedback", json={"request_id": slate["request_id"],
                                              "item_id": target, "event": "click"})
        assert r.status_code == 202
        accepted += 1
        assert target in shown
    model = wait_for(lambda: (m := client.get("/v1/model").json())["feedback_learned"]
                     >= accepted and m["pending_impressions"] == 0 and m)
    assert model["feedback_learned"] == accepted
    assert model["version"] > start["version"] and model["updates"] > 0
    assert model["epsilon"] < start["epsilon"]
    wait_for(lambda: recommend(client, user="probe", context=ctx, k=10, explore=False,
                               exclude_seen=False)["model_version"] == model["version"])
    after = recommend(client, user="probe", context=ctx, k=10, explore=False,
                      exclude_seen=False)["items"]
    rank = [i["item_id"] for i in after].index(target)
    assert rank <= 1, (rank, [i["item_id"] for i in after])


def _learn_a_shop(c) -> list[str]:
    """Item A is clicked on every slate and never bought; item B is clicked and bought on
    every third. Returns the greedy slate once all of it is learned."""
    ctx = {"text": "family evening, kids"}
    initial = [i["item_id"] for i in recommend(c, user="probe", context=ctx, k=10,
                                               explore=False, exclude_seen=False)["items"]]
    a, b = initial[-1], initial[-2]  # the two the untrained policy ranks last
    sent = 0
    for n in range(90):
        slate = recommend(c, user=f"shopper-{n % 7}", context=ctx, k=10, exclude_seen=False)
        events = [(a, "click")] + ([(b, "click"), (b, "purchase")] if n % 3 == 0 else [])
        for item, event in events:
            r = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                             "item_id": item, "event": event})
            assert r.status_code == 202
            sent += 1
    model = wait_for(lambda: (m := c.get("/v1/model").json())["feedback_learned"] >= sent
                     and m["pending_impressions"] == 0 and m)
    wait_for(lambda: recommend(c, user="probe", context=ctx, k=10, explore=False,
                               exclude_seen=False)["model_version"] >= model["version"])
    after = [i["item_id"] for i in recommend(c, user="probe", context=ctx, k=10,
                                             explore=False, exclude_seen=False)["items"]]
    return [i for i in after if i in (a, b)], a, b


def test_head_weights_decide_whether_clicks_or_purchases_rank_first(backend, encoder):
    """The same feedback, learned by a multi-task network: ranked by its click head the
    always-clicked item comes first; ranked by its purchase head the bought one does."""
    with make_client(backend, encoder, head_weights='{"click": 1, "purchase": 0}') as c:
        assert c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                   for i, t in MOVIES]}).status_code == 200
        order, a, b = _learn_a_shop(c)
        assert order == [a, b], order
    with make_client(backend, encoder, head_weights='{"click": 0, "purchase": 1}') as c:
        assert c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                   for i, t in MOVIES]}).status_code == 200
        order, a, b = _learn_a_shop(c)
        assert order == [b, a], order


# -- security and limits --------------------------------------------------------------------
def test_api_keys(backend, encoder):
    with make_client(backend, encoder, api_keys="k1, k2") as c:
        assert_error(c.get("/v1/model"), 401, "unauthorized")
        assert_error(c.get("/v1/model", headers={"X-API-Key": "nope"}), 401)
        assert c.get("/v1/model", headers={"X-API-Key": "k2"}).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_body_over_limit_is_413_and_writes_nothing(backend, encoder):
    with make_client(backend, encoder, max_body_bytes=2000) as c:
        r = c.post("/v1/items", json={"items": [{"item_id": "big", "text": "x" * 3000}]})
        assert_error(r, 413, "payload_too_large")
        assert c.get("/readyz").json()["catalog_size"] == 0
        ok = c.post("/v1/items", json={"items": [{"item_id": "small", "text": "x"}]})
        assert ok.status_code == 200


def test_unknown_route_and_method_use_the_error_body(client):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/v1/recommend", json={}), 405, "method_not_allowed")


def test_closed_impressions_reach_the_evaluation_log(backend, encoder):
    # a reward window long enough that a slow machine's feedback still lands inside it
    with make_client(backend, encoder, reward_wait_s=2.0) as client:
        r = client.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                     for i, t in MOVIES]})
        assert r.status_code == 200
        slate = recommend(client, user="ope-user", k=3)
        clicked = slate["items"][1]["item_id"]
        fb = client.post("/v1/feedback", json={"request_id": slate["request_id"],
                                               "item_id": clicked, "event": "click"})
        assert fb.status_code == 202
        record = wait_for(lambda: next((r for r in client.get("/v1/log").json()["records"]
                                        if r["request_id"] == slate["request_id"]), None))
        assert record["user_id"] == "ope-user" and record["n_candidates"] == 10
        assert record["item_ids"] == [i["item_id"] for i in slate["items"]]
        assert record["propensities"] == [i["propensity"] for i in slate["items"]]
        assert record["rewards"] == [0.0, 1.0, 0.0]
        assert client.delete("/v1/users/ope-user").status_code == 204
        assert all(r["user_id"] != "ope-user" for r in client.get("/v1/log").json()["records"])
        assert_error(client.get("/v1/log", params={"limit": 0}), 422)


def test_batched_slate_choice_equals_one_request_at_a_time(backend, encoder):
    """Concurrent requests share one Q-network call and one index search; each gets the
    slate and scores it would get alone."""
    from app.server.engine import Pick
    from app.store import UserData
    with make_client(backend, encoder) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        engine = c.app.state.engine
        now = time.time()
        ctx = encoder.encode(["family evening, kids", "late night thriller", "romance"])
        history = [{"item_id": "m-2", "event": "click", "ts": now - 5}]
        picks = [Pick(UserData([], []), ctx[0], set(), None, 5, 0.0, now),
                 Pick(UserData(history, [("m-3", now - 5)]), ctx[1], {"m-6"}, None, 4, 0.0, now),
                 Pick(UserData(history, []), None, set(), ["m-1", "m-8", "m-9", "zz"], 3, 0.0, now),
                 Pick(UserData([], []), ctx[2], set(), None, 10, 0.0, now)]
        together = engine.choose_batch(picks)
        for pick, batched in zip(picks, together, strict=True):
            alone = engine.choose_batch([pick])[0]
            assert batched.ids == alone.ids  # candidate ids
            assert np.allclose(batched.scores, alone.scores, atol=1e-5)  # scores
            assert batched.choice.indices.tolist() == alone.choice.indices.tolist()
        assert "m-6" not in together[1].ids and "zz" not in together[2].ids
        assert len(together[3].choice.indices) == 10


@pytest.mark.parametrize("options", [{}, {"adaptation": True}, {"ensemble": False},
                                     {"popularity_lift": "expected"}])
def test_the_batch_program_draws_what_one_request_at_a_time_draws(backend, encoder, options):
    """``choose_batch`` runs a batch as arrays; ``choose_each`` is the per-request
    reference. From the same seed they choose the same candidates, features, scores,
    slates, propensities, arms and expected CTRs: requests of different lengths,
    explicit candidates, resting items held for exploration, greedy and exploring
    requests, new and known users, a learned ensemble."""
    from app.server.engine import Pick
    from app.store import UserData
    from models.ensemble import N_LINEAR, EnsembleParams
    with make_client(backend, encoder, **options) as c:
        c.post("/v1/items", json={"items": [
            {"item_id": i, "text": t, "tags": t.split(". ")[1].split(", ")}
            for i, t in MOVIES]}).raise_for_status()
        engine = c.app.state.engine
        rng = np.random.default_rng(5)
        if engine.scorer.ensemble is not None:  # as if learned: every arm and agent used
            a = rng.standard_normal((N_LINEAR, N_LINEAR)) * 0.3
            engine.scorer.ensemble = EnsembleParams(a @ a.T, rng.standard_normal(N_LINEAR),
                                                    np.array([0.2, 0.3, 0.1, 0.4]),
                                                    slot_weight=-0.4)
        engine.index.record(["m-1", "m-2", "m-2", "m-7", "m-9"], ["m-2", "m-9"])
        now = time.time()
        ctx = encoder.encode(["family evening, kids", "late night thriller"])
        known = UserData([{"item_id": "m-2", "event": "click", "ts": now - 50},
                          {"item_id": "m-4", "event": "skip", "ts": now - 40},
                          {"item_id": "m-9", "event": "purchase", "ts": now - 5}],
                         [("m-3", now - 60), ("m-5", now - 60), ("m-3", now - 20),
                          ("m-6", now - 20), ("m-2", now - 20)])
        new = UserData([], [("m-1", now - 9)])
        picks = [Pick(new, ctx[0], set(), None, 5, 0.5, now, explore=True),
                 Pick(known, ctx[1], {"m-6"}, None, 4, 0.0, now),
                 Pick(known, None, set(), ["m-1", "m-8", "m-9", "zz"], 3, 1.0, now,
                      explore=True),
                 # m-3 and m-5 rest: left out of retrieval, back for the exploration only
                 Pick(known, ctx[0], {"m-1", "m-3", "m-5"}, None, 10, 0.3, now, ["m-3", "m-5"],
                      True),
                 Pick(UserData([], []), None, set(), [], 2, 0.5, now, explore=True),
                 Pick(new, ctx[1], set(), None, 1, 0.0, now, explore=True)]
        for seed in range(6):
            engine._rng = np.random.default_rng(seed)
            batched = engine.choose_batch(picks)
            engine._rng = np.random.default_rng(seed)
            each = engine.choose_each(picks)
            for got, want in zip(batched, each, strict=True):
                assert got.ids == want.ids
                assert np.allclose(got.features, want.features, atol=1e-5)
                assert np.allclose(got.scores, want.scores, atol=1e-5)
                assert got.choice.indices.tolist() == want.choice.indices.tolist()
                assert np.allclose(got.choice.propensities, want.choice.propensities)
                assert got.choice.explored.tolist() == want.choice.explored.tolist()
                assert (got.agents, got.sources, got.depths) == (want.agents, want.sources,
                                                                 want.depths)
                assert got.arm_propensity == pytest.approx(want.arm_propensity)
                assert (got.expected is None) == (want.expected is None)
                if got.expected is not None:
                    assert np.allclose(got.expected, want.expected, atol=1e-6)
        if options.get("popularity_lift") == "expected":  # each slot's expected CTR
            assert all(ch.expected is not None for ch in batched if ch.ids)
        # a batch in which no request has a candidate: empty slates, no error
        empty = [Pick(UserData([], []), None, set(), ["zz"], 2, 0.5, now, explore=True)]
        assert [len(ch.choice.indices) for ch in engine.choose_batch(empty)] == [0]
        assert len(batched[3].choice.indices) == 10 - 1 and not batched[4].ids
        resting = np.isin(batched[3].ids, ["m-3", "m-5"])
        assert resting.sum() == 2 and batched[3].scores[resting].max() < batched[3].scores[
            ~resting].min()
        if engine.scorer.ensemble is not None:  # the exploring requests drew their arms
            assert {a for ch in batched for a in ch.agents} and batched[1].agents == []


def test_changing_only_an_items_tags_reaches_its_features(backend, encoder):
    """Tags feed the per-candidate tag-affinity features: re-sending an item with new tags
    and the same text re-indexes it (no re-embedding needed), and a user who just
    clicked a comedy sees comedies' tag affinity rise."""
    from models.state import FEATURE_GROUPS, tag_vectors
    with make_client(backend, encoder) as c:
        items = [{"item_id": i, "text": t, "tags": ["comedy"] if n % 2 else ["drama"]}
                 for n, (i, t) in enumerate(MOVIES)]
        c.post("/v1/items", json={"items": items}).raise_for_status()
        index = c.app.state.engine.index
        first = MOVIES[0][0]
        assert np.array_equal(index.stats_and_tags_of([first])[1][0], tag_vectors([["drama"]])[0])
        c.post("/v1/items", json={"items": [{"item_id": first, "text": MOVIES[0][1],
                                             "tags": ["Horror", "war"]}]}).raise_for_status()
        assert np.array_equal(index.stats_and_tags_of([first])[1][0],
                              tag_vectors([["horror", "war"]])[0])
        assert c.get(f"/v1/items/{first}").json()["tags"] == ["Horror", "war"]

        # a user who just clicked a comedy: comedies get tag affinity, dramas none
        from app.server.engine import Pick
        from app.store import UserData
        comedy, drama = MOVIES[1][0], MOVIES[2][0]
        now = time.time()
        clicked = UserData([{"item_id": comedy, "event": "click", "ts": now - 5}], [])
        ids = [i for i, _ in MOVIES[1:]]
        chosen = c.app.state.engine.choose_batch(
            [Pick(clicked, None, set(), ids, 3, 0.0, now)])[0]
        got, feats = chosen.ids, chosen.features
        tag_positive = dict(zip(got, feats[:, FEATURE_GROUPS["tags"].start].tolist(),
                                strict=True))
        assert tag_positive[MOVIES[3][0]] > 0.99  # another comedy
        assert tag_positive[drama] == 0.0


@pytest.mark.parametrize("related", [0, 3])
def test_a_click_brings_the_items_nearest_to_it_into_the_next_slate(backend, encoder, related):
    """Beside the two candidates the embedding query retrieves, the related source adds
    the items nearest to what the user just clicked (not the clicked item itself,
    which exclude_seen bans, nor the items resting after being ignored: without the
    ensemble they always rest). The engagement source is off, so only these two
    sources fill the slate."""
    with make_client(backend, encoder, candidates=2, related_candidates=related,
                     engaging_candidates=0, ensemble=False) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        first = recommend(c, k=2, explore=False)
        clicked, ignored = (i["item_id"] for i in first["items"])
        r = c.post("/v1/feedback", json={"request_id": first["request_id"],
                                          "item_id": clicked, "event": "click"})
        assert r.status_code == 202
        after = [i["item_id"] for i in recommend(c, k=5, explore=False)["items"]]
        assert len(after) == 2 + related and not {clicked, ignored} & set(after)
        if related:
            index = c.app.state.engine.index
            others = [m for m, _ in MOVIES if m not in (clicked, ignored)]
            _, vecs = index.vectors_of(others)
            sims = vecs @ index.vectors_of([clicked])[1][0]
            nearest = {others[j] for j in np.argsort(-sims)[:related]}
            assert nearest <= set(after)


def test_similar_and_popular_leave_out_an_item_deleted_while_they_read(backend, encoder):
    """The neighbours and the engagement ranking are read by row, then their ids: an
    item deleted in between (another request, another thread) is not listed."""
    with make_client(backend, encoder) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        index = c.app.state.engine.index
        for source in ("related", "engaging"):
            read = getattr(index, source)
            gone = []

            def read_then_delete(*args, read=read, gone=gone):
                hits = read(*args)
                rows = hits[0][0]
                if len(rows) and not gone:
                    gone.append(index.at_rows([rows[:1]], index.row_generation)[0][0][0])
                    index.remove(gone)
                return hits

            setattr(index, source, read_then_delete)
            url = "/v1/items/m-1/similar?k=5" if source == "related" else "/v1/popular?k=5"
            r = c.get(url)
            delattr(index, source)
            assert r.status_code == 200 and gone
            assert gone[0] not in [it["item_id"] for it in r.json()["items"]]


@pytest.mark.parametrize("lift,ensemble", [("expected", True), ("ctr", True),
                                           ("expected", False)])
def test_a_served_slate_counts_what_each_item_was_expected_to_earn(backend, encoder,
                                                                   lift, ensemble):
    """With ``RECSVC_POPULARITY_LIFT=expected`` popularity is clicks over expected
    clicks: each shown item adds the click probability the logistic model expected of
    it in its slot. Otherwise (or without the ensemble) each adds the catalog's CTR;
    the items that were not shown add nothing."""
    import math

    with make_client(backend, encoder, ensemble=ensemble, popularity_lift=lift) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        engine = c.app.state.engine
        base = engine.index.base_ctr()
        if ensemble:  # a model that expects a click on one item in five, anywhere
            engine.scorer.ensemble.theta[-1] = math.log(0.2 / 0.8)
        r = c.post("/v1/recommend", json={"user_id": "u-1", "k": 3, "explore": False})
        shown = [it["item_id"] for it in r.json()["items"]]
        stats, _ = engine.index.stats_and_tags_of([i for i, _ in MOVIES])
        counted = {i: row for (i, _), row in zip(MOVIES, stats, strict=True)}
        want = 0.2 if lift == "expected" and ensemble else base
        assert all(counted[i][0] == 1 and np.isclose(counted[i][2], want, rtol=1e-4)
                   for i in shown)
        assert not any(row[2] for i, row in counted.items() if i not in shown)


def test_a_compaction_during_slate_choice_is_looked_up_again(backend, encoder):
    """Candidates travel by index row from the search to their counts and tags; when a
    compaction moves rows meanwhile (another thread deleting items), the slate is
    still built from the right items: the same slate, scores and features as when
    nothing moved."""
    from app.server.engine import Pick
    from app.store import UserData
    with make_client(backend, encoder) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t, "tags": [t[-6:]]}
                                            for i, t in MOVIES]})
        engine = c.app.state.engine
        index = engine.index
        now = time.time()
        ctx = encoder.encode(["late night thriller"])[0]
        user = UserData([{"item_id": "m-2", "event": "click", "ts": now - 5}], [])
        index.record(["m-3", "m-6", "m-7"], ["m-3"])
        gone = ["m-1", "m-4", "m-5"]  # a third of the catalog: compacted at once
        search = index.search
        moves = []

        def search_then_compact(*args):
            hits = search(*args)
            if not moves:
                moves.append(index.row_generation)
                index.remove(gone)
            return hits

        index.search = search_then_compact
        chosen = engine.choose_batch([Pick(user, ctx, set(), None, 4, 0.0, now)])[0]
        del index.search
        assert moves and index.row_generation != moves[0]
        expected = engine.choose_batch([Pick(user, ctx, set(), None, 4, 0.0, now)])[0]
        assert not set(gone) & set(chosen.ids)
        assert chosen.ids == expected.ids  # candidates
        assert np.allclose(chosen.scores, expected.scores, atol=1e-6)  # scores
        assert np.array_equal(chosen.features, expected.features)  # per-candidate features
        stats, _ = index.stats_and_tags_of(chosen.ids)
        assert stats[chosen.ids.index("m-3"), :2].tolist() == [1, 1]


def test_405_names_every_method_of_the_path(client):
    """At 3b796b0 the Allow header named only GET on paths that have DELETE too."""
    for path in ("/v1/items/m-1", "/v1/users/u-1"):
        r = client.put(path, json={})
        assert_error(r, 405)
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}


@pytest.mark.parametrize("body", [
    {"items": [{"item_id": "m-x", "text": "t", "available": 0}]},
    {"items": [{"item_id": "m-x", "text": "t", "available": "yes"}]},
])
def test_booleans_are_json_booleans(client, body):
    """The schema says boolean: 0 and "yes" are refused, not coerced (at 3b796b0 an
    item with ``available: 0`` was stored as unavailable)."""
    assert_error(client.post("/v1/items", json=body), 422, "validation_error")
    for field in ("exclude_seen", "explore", "explain"):
        assert_error(client.post("/v1/recommend", json={"user_id": "u", field: 0}), 422)


def test_the_schema_says_which_events_need_a_value(client):
    """A dwell without a value is refused, and the published schema says so (at
    3b796b0 the schema allowed it: a client generated from it got 422s)."""
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("FeedbackIn", "EventIn"):
        rules = {r["if"]["properties"]["event"]["const"]: r["then"]
                 for r in spec[name]["allOf"]}
        assert rules["dwell"]["required"] == ["value"] and rules["rating"]["required"] == [
            "value"]
        assert rules["rating"]["properties"]["value"]["maximum"] == 5


def test_ids_in_paths_follow_the_id_rule(client):
    """API.md's rule for IDs holds in paths too: an id outside it is 422 with the error
    body, not a lookup (on a Redis Cluster, ``}x`` made an empty hash tag and the
    erasure's multi-key DEL failed with CROSSSLOT: 500)."""
    for method, path in (("GET", "/v1/users/%7Dx"), ("DELETE", "/v1/users/%7Dx"),
                         ("GET", "/v1/items/a%20b"), ("DELETE", "/v1/items/" + "x" * 129)):
        assert_error(client.request(method, path), 422)
    assert client.get("/v1/users/u.ok:1@x-y_z").status_code == 200


def test_negative_rewards_are_accepted_and_counted_apart(client):
    """A dislike's reward is negative: accepted like any feedback, and counted in its
    own counter (a Prometheus counter cannot go down). Once, this answered 500."""
    slate = recommend(client, user="grumpy", k=3)
    for event in ("dislike", "click"):
        r = client.post("/v1/feedback", json={"request_id": slate["request_id"],
                                              "item_id": slate["items"][0]["item_id"],
                                              "event": event})
        assert r.status_code == 202, r.text
    text = client.get("/metrics").text
    assert "recsvc_feedback_penalty_total 1.0" in text
    assert "recsvc_feedback_reward_total 1.0" in text


def test_the_catalog_is_listed_a_page_at_a_time_every_item_once(client):
    """v1.1: GET /v1/items with a cursor: pages in a stable order, every item once
    (unavailable ones too, as GET /v1/items/{id} shows them), then a null cursor."""
    assert client.post("/v1/items", json={"items": [
        {"item_id": "zz-off", "text": "withdrawn", "available": False}]}).status_code == 200
    seen, cursor, pages = [], None, 0
    while True:
        r = client.get("/v1/items", params={"limit": 4, **({"cursor": cursor} if cursor
                                                            else {})})
        assert r.status_code == 200
        body = r.json()
        assert len(body["items"]) <= 4
        seen += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [i["item_id"] for i in seen]
    assert len(ids) == len(set(ids)) == 11 and pages == 3 and ids == sorted(ids)
    assert seen[-1] == {"item_id": "zz-off", "text": "withdrawn", "tags": [],
                        "available": False}
    assert client.get("/v1/items", params={"limit": 100}).json()["items"] == seen
    for bad in ({"cursor": "%%%"}, {"cursor": "a=="}, {"limit": 0}, {"limit": 1001}):
        assert_error(client.get("/v1/items", params=bad), 422)
    # a cursor this service did not give still names a place in id order
    after_m = client.get("/v1/items", params={"cursor": "bS0z"}).json()  # "m-3"
    assert [i["item_id"] for i in after_m["items"]] == [i for i in ids if i > "m-3"]


def test_a_deferred_slate_learns_only_from_what_was_displayed(backend, encoder):
    """v1.1 defer_seen: POST /v1/seen marks displayed items (202; 404 unknown request;
    422 an item not in the slate). When the window closes, only displayed items are
    learned from (feedback on another is accepted, not learned); the evaluation log
    keeps the slots down to the first one never displayed. A deferred slate that
    nobody marked is not learned from at all; one without defer_seen is, whole."""
    with make_client(backend, encoder, reward_wait_s=2.0) as client:
        assert client.post("/v1/items", json={"items": [
            {"item_id": i, "text": t} for i, t in MOVIES]}).status_code == 200
        marked = client.post("/v1/recommend", json={"user_id": "d-1", "k": 5,
                                                    "defer_seen": True}).json()
        unmarked = client.post("/v1/recommend", json={"user_id": "d-2", "k": 5,
                                                      "defer_seen": True}).json()
        plain = recommend(client, user="d-3", k=5)
        items = [i["item_id"] for i in marked["items"]]
        r = client.post("/v1/seen", json={"request_id": marked["request_id"],
                                          "item_ids": items[:2] + items[:1]})
        assert r.status_code == 202 and r.json() == {"accepted": True, "seen": 2}
        # the 4th is clicked but never marked displayed: accepted, not learned from
        assert client.post("/v1/feedback", json={"request_id": marked["request_id"],
                                                 "item_id": items[3],
                                                 "event": "click"}).status_code == 202
        assert_error(client.post("/v1/seen", json={"request_id": "01NOPE",
                                                   "item_ids": items[:1]}), 404,
                     "unknown_request")
        outside = next(i for i, _ in MOVIES if i not in items)
        assert_error(client.post("/v1/seen", json={"request_id": marked["request_id"],
                                                   "item_ids": [outside]}), 422,
                     "item_not_in_slate")
        assert_error(client.post("/v1/seen", json={"request_id": marked["request_id"],
                                                   "item_ids": []}), 422)

        def logged():
            records = {r["request_id"]: r for r in client.get("/v1/log").json()["records"]}
            return plain["request_id"] in records and marked["request_id"] in records \
                and records

        records = wait_for(logged, 15, "the windows to close")
        assert records[marked["request_id"]]["item_ids"] == items[:2]
        assert len(records[plain["request_id"]]["item_ids"]) == 5
        assert unmarked["request_id"] not in records
        # the deferred slates' learning: the 2 displayed items, against 5 items of the
        # plain slate; the click on an item never marked and the unmarked slate, nothing
        learner = client.app.state.learner
        assert learner.stats()["transitions"] == 5 + 2
