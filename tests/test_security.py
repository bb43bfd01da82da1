"""Who may do what: API keys, admin keys, the per-key rate limit, keys kept out of
logs, model rollback and the erasure of a user, against both store backends."""

import logging
import time
import uuid

import pytest
import torch
from fastapi.testclient import TestClient

from app.server.api import create_app
from app.settings import Settings
from tests.test_api import FAST, MOVIES, assert_error, make_client, recommend, wait_for

API, ADMIN = "user-key-3f9a", "admin-key-77c1"
ITEMS = {"items": [{"item_id": i, "text": t} for i, t in MOVIES]}


def as_key(key: str | None) -> dict:
    return {"X-API-Key": key} if key else {}


WINDOW_S = 60


def early_in_a_window(need_s: float = 20.0) -> None:
    """Rate-limit windows are aligned to the clock: a test that counts requests across
    a window's end sees its count reset (CI failed so once). Wait for the next window
    when less than ``need_s`` of this one is left."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < need_s:
        time.sleep(left + 0.05)


@pytest.fixture
def secured(backend, encoder):
    with make_client(backend, encoder, api_keys=API, admin_keys=ADMIN) as c:
        assert c.post("/v1/items", json=ITEMS, headers=as_key(ADMIN)).status_code == 200
        yield c


def test_every_v1_route_needs_a_valid_key(secured):
    c = secured
    for key in (None, "", "wrong", API + "x", API[:-1]):
        assert_error(c.get("/v1/model", headers=as_key(key)), 401, "unauthorized")
        assert_error(c.post("/v1/recommend", json={"user_id": "u"}, headers=as_key(key)), 401)
        assert_error(c.post("/v1/items", json=ITEMS, headers=as_key(key)), 401)
    for key in (API, ADMIN):  # an admin key can do what an API key can
        assert c.get("/v1/model", headers=as_key(key)).status_code == 200
        r = c.post("/v1/recommend", json={"user_id": "u", "k": 2}, headers=as_key(key))
        assert r.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(path).status_code == 200


def test_admin_operations_need_an_admin_key(secured):
    c = secured
    writes = [
        lambda k: c.post("/v1/items", json={"items": [{"item_id": "m-x", "text": "X"}]},
                         headers=as_key(k)),
        lambda k: c.delete("/v1/items/m-2", headers=as_key(k)),
        lambda k: c.delete("/v1/users/u-1", headers=as_key(k)),
        lambda k: c.get("/v1/log", headers=as_key(k)),
        lambda k: c.post("/v1/model/rollback", headers=as_key(k)),
    ]
    for call in writes:
        assert_error(call(None), 401, "unauthorized")
        assert_error(call(API), 403, "forbidden")
    assert c.get("/v1/items/m-x", headers=as_key(API)).status_code == 404  # nothing written
    assert c.get("/v1/items/m-2", headers=as_key(API)).status_code == 200  # nothing deleted
    assert writes[0](ADMIN).status_code == 200
    assert writes[1](ADMIN).status_code == 204
    assert writes[2](ADMIN).status_code == 204
    assert writes[3](ADMIN).status_code == 200
    assert_error(writes[4](ADMIN), 409, "no_previous_version")  # nothing published yet


def test_keys_from_a_mounted_file(backend, encoder, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  # the new one\n")
    admin = tmp_path / "admin"
    admin.write_text("file-admin\n")
    with make_client(backend, encoder, api_keys_file=str(keys),
                     admin_keys_file=str(admin)) as c:
        assert c.get("/v1/model", headers=as_key("file-key-2")).status_code == 200
        assert c.get("/v1/model", headers=as_key("file-key-1")).status_code == 200
        assert_error(c.get("/v1/model", headers=as_key("# rotated 2026-11")), 401)
        assert_error(c.post("/v1/items", json=ITEMS, headers=as_key("file-key-1")), 403)
        assert c.post("/v1/items", json=ITEMS, headers=as_key("file-admin")).status_code == 200


def test_api_keys_without_admin_keys_leave_no_one_writing_the_catalog(backend, encoder):
    with make_client(backend, encoder, api_keys=API) as c:
        err = assert_error(c.post("/v1/items", json=ITEMS, headers=as_key(API)), 403)
        assert "RECSVC_ADMIN_KEYS" in err["message"]
        assert c.get("/v1/model", headers=as_key(API)).status_code == 200


def test_keys_never_reach_the_logs(backend, encoder, caplog):
    caplog.set_level(logging.DEBUG)
    settings = Settings(**{**FAST, **backend[1], "api_keys": API, "admin_keys": ADMIN})
    logging.getLogger("recsvc.test").info("settings: %r", settings)
    with TestClient(create_app(settings, encoder=encoder)) as c:
        c.post("/v1/items", json=ITEMS, headers=as_key(ADMIN))
        c.get("/v1/model", headers=as_key("a-wrong-key-in-a-header"))
        c.post("/v1/items", json=ITEMS, headers=as_key(API))
        slate = c.post("/v1/recommend", json={"user_id": "u", "k": 2},
                       headers=as_key(API)).json()
        c.post("/v1/feedback", headers=as_key(API), json={
            "request_id": slate["request_id"], "item_id": slate["items"][0]["item_id"],
            "event": "click"})
        wait_for(lambda: c.get("/v1/model", headers=as_key(API)).json()["version"] >= 1)
    assert caplog.records, "nothing was logged: the check would be empty"
    for secret in (API, ADMIN, "a-wrong-key-in-a-header"):
        assert secret not in caplog.text


def test_rate_limit_is_per_key_with_retry_after(backend, encoder):
    early_in_a_window()
    with make_client(backend, encoder, api_keys="k-a,k-b", admin_keys=ADMIN,
                     rate_limit=5, rate_limit_window_s=WINDOW_S) as c:
        codes = [c.get("/v1/model", headers=as_key("k-a")).status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        r = c.get("/v1/model", headers=as_key("k-a"))
        assert_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= WINDOW_S
        assert c.get("/v1/model", headers=as_key("k-b")).status_code == 200  # its own count
        assert c.get("/healthz").status_code == 200  # operations are never limited
        assert "recsvc_rate_limited_total 3.0" in c.get("/metrics").text


def test_rate_limit_is_shared_by_replicas_on_one_redis(redis_url, redis_prefix, encoder):
    cfg = dict(**FAST, redis_url=redis_url, key_prefix=redis_prefix, api_keys="k",
               rate_limit=4, rate_limit_window_s=WINDOW_S)
    early_in_a_window()
    with TestClient(create_app(Settings(**cfg), encoder=encoder)) as a, \
            TestClient(create_app(Settings(**cfg), encoder=encoder)) as b:
        codes = [(a if n % 2 else b).get("/v1/model", headers=as_key("k")).status_code
                 for n in range(6)]
        assert codes == [200, 200, 200, 200, 429, 429]


def _learn_a_version(c, headers, user="roll") -> int:
    before = c.get("/v1/model", headers=headers).json()["version"]
    slate = recommend_with(c, headers, user)
    r = c.post("/v1/feedback", headers=headers, json={
        "request_id": slate["request_id"], "item_id": slate["items"][0]["item_id"],
        "event": "click"})
    assert r.status_code == 202
    return wait_for(lambda: (v := c.get("/v1/model", headers=headers).json()["version"])
                    > before and v)


def recommend_with(c, headers, user):
    r = c.post("/v1/recommend", headers=headers,
               json={"user_id": user, "k": 3, "context": {"text": "kids"}})
    assert r.status_code == 200
    return r.json()


def test_rollback_serves_the_previous_weights_and_learning_continues_from_them(secured):
    c, admin = secured, as_key(ADMIN)
    registry = c.app.state.engine.store.registry

    def weights(coro_fn, *args):  # store calls on the app's own event loop
        return c.portal.call(coro_fn, *args)

    first = _learn_a_version(c, admin, "roll-1")
    second = _learn_a_version(c, admin, "roll-2")
    r = c.post("/v1/model/rollback", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["restored_from"] == first and body["version"] > second
    assert weights(registry.get_weights, body["version"]) == weights(registry.get_weights, first)
    # this replica serves it at once, and reports it (or a version the learner built
    # on it since: what it had learned on the replaced weights and not committed is
    # learned again on the restored ones)
    assert recommend_with(c, admin, "after")["model_version"] >= body["version"]
    assert c.get("/v1/model", headers=admin).json()["version"] >= body["version"]
    # the learner continues from the restored weights instead of overwriting them
    third = _learn_a_version(c, admin, "roll-3")
    assert third >= body["version"] + 1
    lineage = [third]
    while lineage[-1] > body["version"]:
        lineage.append(weights(registry.weights_parent, lineage[-1]))
    assert lineage[-1] == body["version"]
    # and it did not overwrite the restored version with the weights it had before
    assert weights(registry.get_weights, body["version"]) == weights(registry.get_weights, first)


def test_non_finite_weights_are_never_published(secured):
    """Inject NaN into the learner's network: the version is not published, the last
    good one keeps serving, and the learner goes back to it and learns on."""
    c, admin = secured, as_key(ADMIN)
    _learn_a_version(c, admin, "nan-1")
    learner = c.app.state.learner
    # no learning under way (a round that trains on NaN weights is rolled back and may
    # publish the restored, finite weights: that is not what this test is about)
    wait_for(lambda: not learner.pending and not learner._dirty)
    good = c.get("/v1/model", headers=admin).json()["version"]
    with torch.no_grad():
        next(learner.learner.online.parameters()).fill_(float("nan"))
    learner._dirty = True
    rejected = learner.learner.rejected_updates
    assert wait_for(lambda: learner.learner.rejected_updates > rejected)
    assert c.get("/v1/model", headers=admin).json()["version"] == good
    assert recommend_with(c, admin, "nan-2")["model_version"] == good
    assert all(torch.isfinite(p).all() for p in learner.learner.online.parameters())
    assert _learn_a_version(c, admin, "nan-3") == good + 1


def test_erasing_a_user_drops_their_pending_impressions(backend, encoder):
    """Impressions still inside their reward window when the user is erased are never
    learned from or written to the evaluation log."""
    with make_client(backend, encoder, reward_wait_s=1.0) as c:
        c.post("/v1/items", json=ITEMS)
        gone = recommend(c, user="erase-me", k=3)
        kept = recommend(c, user="stays", k=3)
        # the learner holds both, waiting for their reward windows to close
        wait_for(lambda: c.get("/v1/model").json()["pending_impressions"] == 2)
        assert c.delete("/v1/users/erase-me").status_code == 204
        log = wait_for(lambda: (recs := c.get("/v1/log").json()["records"]) and recs)
        assert [r["request_id"] for r in log] == [kept["request_id"]]
        assert gone["request_id"] not in {r["request_id"] for r in log}
        wait_for(lambda: c.get("/v1/model").json()["pending_impressions"] == 0)
        assert [r["request_id"] for r in c.get("/v1/log").json()["records"]] \
            == [kept["request_id"]]


def test_a_rollback_is_never_overwritten_by_a_learner_commit(secured):
    """The learner has learned on version N; a rollback publishes N+1 just after the
    learner looked for newer versions and before it commits. The commit is refused
    (compare and set on the version), the rollback keeps serving, and the entries whose
    learning was dropped are not acknowledged: they are learned again on top of it.
    At 3b796b0 the learner's N+1 replaced the rollback's N+1."""
    c, admin = secured, as_key(ADMIN)
    store = c.app.state.engine.store
    learner = c.app.state.learner

    def call(coro_fn, *args):
        return c.portal.call(coro_fn, *args)

    first = _learn_a_version(c, admin, "cas-1")
    _learn_a_version(c, admin, "cas-2")
    restored = call(store.registry.get_weights, first)
    commit = store.registry.commit_learning
    raced = []

    async def rollback_first(*args, **kwargs):
        weights = args[-1] if len(args) >= 6 else kwargs.get("weights")
        if weights is not None and not raced:
            raced.append(weights.version)
            rollback = c.app.state.engine.rollback  # through the API's own path
            await rollback()
        return await commit(*args, **kwargs)

    store.registry.commit_learning = rollback_first
    try:
        recommend_with(c, admin, "cas-3")
        slate = recommend_with(c, admin, "cas-3")
        c.post("/v1/feedback", headers=admin, json={"request_id": slate["request_id"],
                                                    "item_id": slate["items"][0]["item_id"],
                                                    "event": "click"})
        wait_for(lambda: raced)
    finally:
        store.registry.commit_learning = commit
    rolled = raced[0]  # the rollback took the number the learner was about to publish
    wait_for(lambda: call(store.registry.latest_version) >= rolled)
    assert call(store.registry.get_weights, rolled) == restored
    # the learner continues from the rollback: its next version's parent is it
    after = _learn_a_version(c, admin, "cas-4")
    assert after > rolled and call(store.registry.weights_parent, after) == rolled
    assert call(store.registry.get_weights, rolled) == restored
    assert learner.version >= after


def test_a_store_that_lost_the_latest_versions_does_not_stop_the_learner(redis_url, encoder):
    """Redis restarted without persistence (or a failover to a replica behind) has no
    record of the versions the learner published. The learner's next commit compares
    against a version the store lost; it resyncs to the store's latest and keeps
    publishing (before, every later commit conflicted and nothing was published or
    acknowledged again)."""
    import redis as redis_sync

    prefix = f"lost-{uuid.uuid4().hex[:8]}"
    r = redis_sync.Redis.from_url(redis_url)
    try:
        with make_client(("redis", {"redis_url": redis_url, "key_prefix": prefix}), encoder,
                         api_keys=API, admin_keys=ADMIN) as c:
            admin = as_key(ADMIN)
            store = c.app.state.engine.store
            assert c.post("/v1/items", json=ITEMS, headers=admin).status_code == 200
            _learn_a_version(c, admin, "lost-1")
            assert _learn_a_version(c, admin, "lost-2") >= 2
            for key in r.scan_iter(f"{prefix}*"):  # everything this service wrote, gone
                r.delete(key)
            for round_ in (1, 2):  # published again, and again on top of that
                slate = recommend_with(c, admin, f"lost-{2 + round_}")
                fb = c.post("/v1/feedback", headers=admin, json={
                    "request_id": slate["request_id"],
                    "item_id": slate["items"][0]["item_id"], "event": "click"})
                assert fb.status_code == 202
                wait_for(lambda n=round_: c.portal.call(store.registry.latest_version) >= n,
                         timeout=20, what=f"version {round_} published after the loss")
    finally:
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)


def test_nothing_of_an_erased_user_comes_back(backend, encoder):
    """A closed impression already in the learner's backlog when the user is erased is
    not appended to the evaluation log afterwards (at 3b796b0 it was: the erasure had
    scanned the log before the learner's next commit wrote it)."""
    with make_client(backend, encoder, reward_wait_s=0.2, publish_interval_s=3.0) as c:
        c.post("/v1/items", json=ITEMS)
        learner = c.app.state.learner
        warm = recommend(c, user="someone", k=3)  # a first version, so the next waits
        c.post("/v1/feedback", json={"request_id": warm["request_id"],
                                     "item_id": warm["items"][0]["item_id"],
                                     "event": "click"})
        wait_for(lambda: c.get("/v1/model").json()["version"] >= 1)
        slate = recommend(c, user="erase-me", k=3)
        c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                     "item_id": slate["items"][0]["item_id"],
                                     "event": "click"})
        # learned and closed, waiting in the backlog for the next version's commit
        wait_for(lambda: any(r["request_id"] == slate["request_id"]
                             for r in learner._log_backlog))
        assert c.delete("/v1/users/erase-me").status_code == 204
        version = c.get("/v1/model").json()["version"]
        wait_for(lambda: not learner._log_backlog and
                 c.get("/v1/model").json()["version"] > version, timeout=15)
        records = c.get("/v1/log").json()["records"]
        assert all(r["user_id"] != "erase-me" for r in records), records
        assert c.get("/v1/users/erase-me").json()["history"] == []


async def test_feedback_racing_an_erasure_does_not_bring_the_history_back(redis_url,
                                                                          redis_prefix):
    """The feedback was validated against its slate, then the user was erased, then the
    feedback's writes ran: the history stays empty (at 3b796b0 they recreated it)."""
    from app.store.redis_store import RedisStore

    s = RedisStore(redis_url, redis_prefix)
    await s.impressions.log_impression(imp_for("r", "racer"), 60, 10)
    write = s.impressions._write_feedback

    async def erase_then_write(*args):
        await s.users.delete_user("racer")
        await write(*args)

    s.impressions._write_feedback = erase_then_write
    out = await s.impressions.feedback_on_slate("r", "a", "click", None, 1.0, time.time(), 60, 10)
    assert out.status == "accepted"
    assert (await s.users.get_user("racer")).history == []
    assert not await s.r.exists(s._user("racer", "hist"))
    await s.close()


def imp_for(rid, user):
    import numpy as np

    from app.store import Impression
    return Impression(rid, user, time.time(), 1, np.ones(4, np.float32).tobytes(), ["a", "b"],
                      [0.9, 0.5], [False, False])


def test_a_keyless_service_refuses_to_listen_beyond_loopback():
    """Serving with no key on an address other hosts reach is refused unless asked for
    (at 3b796b0 compose ran the replicas on 0.0.0.0 with no keys)."""
    from app.tools.cli import refuse_open_exposure

    open_settings = Settings()
    refuse_open_exposure(open_settings, "127.0.0.1")  # the development default
    refuse_open_exposure(open_settings, "localhost")
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(SystemExit, match="RECSVC_API_KEYS"):
            refuse_open_exposure(open_settings, host)
    refuse_open_exposure(Settings(api_keys="k"), "0.0.0.0")
    refuse_open_exposure(Settings(allow_open=True), "0.0.0.0")


def test_without_keys_the_rate_limit_counts_clients_behind_a_trusted_proxy(encoder):
    """Behind a proxy every request comes from its address; with the proxy trusted,
    the limit counts each client named by X-Forwarded-For (at 3b796b0 all clients of a
    proxy shared one count)."""
    cfg = dict(**FAST, rate_limit=2, rate_limit_window_s=WINDOW_S, trusted_proxies="127.0.0.0/8")
    early_in_a_window()
    with TestClient(create_app(Settings(**cfg), encoder=encoder),
                    client=("127.0.0.1", 40000)) as c:  # the proxy's address
        def get(client):
            return c.get("/v1/model", headers={"X-Forwarded-For": f"{client}, 127.0.0.1"})
        codes = [get("203.0.113.7").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert get("203.0.113.8").status_code == 200  # another client, its own count


def test_a_forged_forwarded_for_line_before_the_proxys_own_is_not_believed(encoder):
    """A proxy that adds its own X-Forwarded-For line (HAProxy's ``forwardfor``) leaves
    the client's forged line first; the client is the last untrusted hop over all
    lines in order, so forging a new address per request does not reset the count."""
    cfg = dict(**FAST, rate_limit=2, rate_limit_window_s=WINDOW_S, trusted_proxies="127.0.0.0/8")
    early_in_a_window()
    with TestClient(create_app(Settings(**cfg), encoder=encoder),
                    client=("127.0.0.1", 40000)) as c:
        codes = [c.get("/v1/model", headers=[("X-Forwarded-For", f"198.51.100.{n}"),
                                             ("X-Forwarded-For", "203.0.113.7")]).status_code
                 for n in range(3)]
        assert codes == [200, 200, 429]


def test_the_learners_status_needs_an_admin_key_when_keys_are_set(redis_url, redis_prefix):
    from app.learner.process import create_learner_app

    settings = Settings(**FAST, redis_url=redis_url, key_prefix=redis_prefix,
                        api_keys=API, admin_keys=ADMIN)
    with TestClient(create_learner_app(settings)) as c:
        assert_error(c.get("/status"), 401)
        assert_error(c.get("/status", headers=as_key(API)), 403)
        assert c.get("/status", headers=as_key(ADMIN)).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404


def test_the_api_docs_need_a_key_when_keys_are_set(secured):
    assert_error(secured.get("/openapi.json"), 401)
    assert secured.get("/openapi.json", headers=as_key(API)).status_code == 200


def test_rollback_to_weights_of_another_network_shape_is_refused(backend, encoder):
    """After an upgrade that changed the network's shape, the version a rollback would
    return to was saved by the older release: 409, and the served version is kept,
    instead of a 200 for weights that no replica can load."""
    from models.qnet import QNetwork, weights_to_bytes

    with TestClient(create_app(Settings(**{**FAST, **backend[1]}), encoder=encoder,
                               run_learner=False)) as c:
        engine = c.app.state.engine
        net = engine.scorer.net
        older = QNetwork(net.state_dim, net.item_dim, hidden=net.hidden * 2, trunk_rank=0)
        latest = c.portal.call(engine.store.registry.latest_version)
        c.portal.call(engine.store.registry.publish_weights, latest + 1,
                      weights_to_bytes(older), {})
        c.portal.call(lambda: engine.store.registry.publish_weights(
            latest + 2, weights_to_bytes(net), {}, parent=latest + 1))
        c.portal.call(engine.refresh_weights)
        assert c.get("/v1/model").json()["version"] == latest + 2
        assert_error(c.post("/v1/model/rollback"), 409, "no_previous_version")
        assert c.get("/v1/model").json()["version"] == latest + 2
        assert c.portal.call(engine.store.registry.latest_version) == latest + 2
