"""Explanations ("explain": true) and model-wide importance, over HTTP, both stores.

The reasons are counterfactual, so they can be checked against the service itself:
a part's contribution is the score the item loses when a request comes without it.
"""

import pytest

from tests.test_api import MOVIES, assert_error, make_client, recommend, wait_for

ALL = [i for i, _ in MOVIES]


@pytest.fixture
def client(backend, encoder):
    # the reasons explain the Q-network's score; without the ensemble that is the item's
    with make_client(backend, encoder, admin_keys="admin", api_keys="user",
                     ensemble=False) as c:
        c.headers["X-API-Key"] = "admin"
        r = c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        assert r.status_code == 200
        yield c


def scores(c, user, **kw) -> dict[str, dict]:
    body = recommend(c, user=user, k=10, candidates=ALL, explore=False, explain=True, **kw)
    return {i["item_id"]: i for i in body["items"]}


def test_without_explain_the_body_is_api_md_exactly(client):
    body = recommend(client, user="plain", k=3)
    assert all(set(i) == {"item_id", "score", "explored", "propensity"} for i in body["items"])


def test_every_item_is_explained_with_its_score_and_exploration(client):
    body = recommend(client, user="curious", k=10, explain=True)
    assert len(body["items"]) == 10
    for item in body["items"]:
        why = item["explanation"]
        assert why["explored"] == item["explored"]
        assert why["score"] == pytest.approx(item["score"], abs=1e-4)
        assert len(why["reasons"]) <= 3
        assert {r["kind"] for r in why["reasons"]} <= {"context", "history", "ignored"}


def test_the_context_reason_is_what_the_score_loses_without_the_context(client):
    ctx = {"text": "family evening, kids"}
    with_ctx = scores(client, "ctx-a", context=ctx)
    without = scores(client, "ctx-b", context=None)  # another new user: same history (none)
    for item_id, item in with_ctx.items():
        (reason,) = [r for r in item["explanation"]["reasons"] if r["kind"] == "context"]
        assert reason["contribution"] == pytest.approx(
            item["score"] - without[item_id]["score"], abs=1e-4)
    # the untrained policy ranks by content: the children's films owe their rank to it
    best = max(with_ctx.values(), key=lambda i: i["score"])
    assert best["item_id"] in {"m-1", "m-5", "m-9"}
    assert next(r for r in best["explanation"]["reasons"]
                if r["kind"] == "context")["contribution"] > 0


def test_a_history_item_is_the_reason_for_what_resembles_it(client):
    """A user who bought GoldenEye is shown action thrillers because of it: the reason
    names GoldenEye, and its contribution is what a user without it would score."""
    ok = client.post("/v1/events", json={"user_id": "fan", "item_id": "m-2",
                                         "event": "purchase"})
    assert ok.status_code == 202
    fan = scores(client, "fan", context=None, exclude_seen=False)
    fresh = scores(client, "nobody", context=None, exclude_seen=False)
    for item_id in ("m-3", "m-7", "m-10"):  # action thrillers, like m-2
        reasons = fan[item_id]["explanation"]["reasons"]
        assert reasons[0]["kind"] == "history"
        assert (reasons[0]["item_id"], reasons[0]["event"]) == ("m-2", "purchase")
        assert reasons[0]["contribution"] == pytest.approx(
            fan[item_id]["score"] - fresh[item_id]["score"], abs=1e-4)
        assert reasons[0]["contribution"] > 0
    romance = fan["m-4"]["explanation"]["reasons"][0]["contribution"]
    assert fan["m-3"]["explanation"]["reasons"][0]["contribution"] > romance


def test_importance_is_admin_only_and_measured_on_logged_impressions(backend, encoder):
    with make_client(backend, encoder, admin_keys="admin", api_keys="user",
                     reward_wait_s=0.2) as c:
        c.headers["X-API-Key"] = "admin"
        assert c.post("/v1/items", json={"items": [{"item_id": i, "text": t}
                                                   for i, t in MOVIES]}).status_code == 200
        empty = c.get("/v1/model/importance").json()
        assert empty["impressions"] == 0 and empty["parts"] == []
        for n in range(6):
            recommend(c, user=f"imp-{n}", k=5,
                      context={"text": ["family evening, kids", "late night thriller"][n % 2]})
        wait_for(lambda: len(c.get("/v1/log").json()["records"]) >= 6)
        assert_error(c.get("/v1/model/importance", headers={"X-API-Key": "user"}), 403)
        got = c.get("/v1/model/importance", params={"limit": 100}).json()
        assert got["impressions"] == 6 and got["items"] == 30
        parts = {p["part"]: p for p in got["parts"]}
        assert set(parts) == {"context", "positive_pool", "negative_pool", "scalars",
                              "exposure", "popularity", "affinity", "tags", "repeat"}
        changes = [p["mean_abs_q_change"] for p in got["parts"]]
        assert changes == sorted(changes, reverse=True)
        # all but untrained (six slates of zero reward learned): the content prior reads
        # the context, and the per-candidate feature weights, which start at zero, have
        # moved little (how many of the learner's few steps were published by now
        # depends on timing: on a loaded machine, all of them)
        context = parts["context"]["mean_abs_q_change"]
        assert got["parts"][0]["part"] == "context" and context > 0
        for group in ("exposure", "popularity", "affinity", "tags", "repeat"):
            assert parts[group]["mean_abs_q_change"] < 0.1 * context
        assert_error(c.get("/v1/model/importance", params={"limit": 0}), 422)
