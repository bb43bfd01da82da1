"""One contract, three backends: the embedded store, a real Redis server and a real
3-node Redis Cluster (every multi-key operation must stay within one hash slot)."""

import asyncio
import time
import uuid

import numpy as np
import pytest

from app.store import Impression, ItemRecord, StoreUnavailable, UserData
from app.store import memory as memory_backend
from app.store import redis_catalog as redis_backend
from app.store.base import FeedbackEvent, FeedbackOutcome, WeightsUpdate
from app.store.memory import MemoryStore
from app.store.redis_store import RedisStore


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request):
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"),
                       request.getfixturevalue("redis_prefix"))
    else:
        prefix = f"recsvc-test-{uuid.uuid4().hex[:12]}"
        s = RedisStore(request.getfixturevalue("redis_cluster_url"), prefix, cluster=True)
    yield s
    if request.param == "redis-cluster":  # the cluster is private: drop what the test wrote
        keys = [k async for k in s.r.scan_iter(match=f"{s.p}:*", count=1000)]
        for k in keys:
            await s.r.delete(k)
    await s.close()


def item(i: str, text: str = "t", available: bool = True) -> ItemRecord:
    return ItemRecord(i, text, ["x"], available, np.arange(4, dtype=np.float32).tobytes(),
                      f"k:{text}")


def imp(rid: str, user: str = "u1", items=("a", "b")) -> Impression:
    return Impression(rid, user, time.time(), 3, np.ones(5, dtype=np.float32).tobytes(),
                      list(items), [0.9, 0.5], [False, True])


# -- the catalog (CatalogStore) ------------------------------------------------------------


async def test_items_round_trip(store):
    assert await store.catalog.put_items([item("a"), item("b", available=False)]) == 2
    assert await store.catalog.put_items([item("a", "new text")]) == 2
    got = await store.catalog.get_items(["a", "b", "zz"])
    assert set(got) == {"a", "b"}
    assert got["a"].text == "new text" and got["a"].text_key == "k:new text"
    assert got["b"].available is False and got["b"].tags == ["x"]
    assert np.frombuffer(got["a"].embedding, dtype=np.float32).tolist() == [0, 1, 2, 3]
    assert sorted(await store.catalog.all_item_ids()) == ["a", "b"]
    assert await store.catalog.delete_item("a") is True
    assert await store.catalog.delete_item("a") is False
    assert await store.catalog.catalog_size() == 1


async def test_catalog_changes_are_announced_with_their_origin(store):
    before = await store.catalog.last_catalog_change()
    await store.catalog.put_items([item("a"), item("b")], origin="replica-1")
    await store.catalog.delete_item("a", origin="replica-2")
    changes, complete = await store.catalog.catalog_changes(before)
    assert complete
    assert [(o, ids) for _, o, ids in changes] == [("replica-1", ["a", "b"]),
                                                  ("replica-2", ["a"])]
    assert await store.catalog.last_catalog_change() == changes[-1][0]
    assert await store.catalog.catalog_changes(changes[-1][0]) == ([], True)
    after_first, _ = await store.catalog.catalog_changes(changes[0][0])
    assert [c[0] for c in after_first] == [changes[1][0]]


async def test_a_replica_that_missed_trimmed_changes_is_told_to_reload(store, monkeypatch):
    monkeypatch.setattr(memory_backend, "CATALOG_CHANGES_KEPT", 5)
    monkeypatch.setattr(redis_backend, "CATALOG_CHANGES_KEPT", 5)
    start = await store.catalog.last_catalog_change()
    for n in range(250):  # Redis trims whole stream nodes (100 entries) at a time
        await store.catalog.put_items([item(f"i{n}")], origin="o")
    _, complete = await store.catalog.catalog_changes(start)
    assert complete is False
    latest = await store.catalog.last_catalog_change()
    assert await store.catalog.catalog_changes(latest) == ([], True)


# -- the embedding cache (EmbeddingCache) --------------------------------------------------


async def test_embedding_cache(store):
    assert await store.embeddings.get_embedding("m:1") is None
    await store.embeddings.put_embedding("m:1", b"\x01\x02", ttl_s=60)
    assert await store.embeddings.get_embedding("m:1") == b"\x01\x02"


# -- users (UserStore) ---------------------------------------------------------------------


async def test_history_is_bounded_and_ordered(store):
    for n in range(5):
        await store.users.add_event("u1", {"item_id": f"i{n}", "event": "click", "ts": float(n),
                                           "value": None}, max_len=3)
    data = await store.users.get_user("u1")
    assert [h["item_id"] for h in data.history] == ["i2", "i3", "i4"]
    assert await store.users.get_user("nobody") == UserData([], [])


async def test_delete_user_erases_history_impressions_and_events(store):
    await store.impressions.log_impression(imp("r1", "gone"), 60, 10)
    await store.impressions.log_impression(imp("r2", "kept"), 60, 10)
    await store.impressions.record_feedback("r1", "gone", "a", "click", None, 1.0, 5.0, 60, 10)
    await store.users.delete_user("gone")
    assert await store.users.get_user("gone") == UserData([], [])
    assert list(await store.impressions.get_impressions(["r1", "r2"])) == ["r2"]
    entries = await store.stream.read_stream("c1", 100)
    assert {f["user_id"] for _, f in entries} == {"kept"}


# -- impressions, feedback and the evaluation log (ImpressionLog) --------------------------


async def test_impression_feedback_and_dedupe(store):
    await store.impressions.log_impression(imp("r1"), ttl_s=60, shown_max=10)
    got = (await store.impressions.get_impressions(["r1", "r2"]))
    assert list(got) == ["r1"]
    assert got["r1"].item_ids == ["a", "b"] and got["r1"].explored == [False, True]
    assert got["r1"].propensities == [0.9, 0.5] and got["r1"].model_version == 3
    assert np.frombuffer(got["r1"].state, dtype=np.float32).tolist() == [1.0] * 5
    assert [i for i, _ in (await store.users.get_user("u1")).shown] == ["a", "b"]
    assert await store.impressions.slate_of("r1") == ("u1", ["a", "b"])
    assert await store.impressions.slate_of("r2") is None
    imps = store.impressions
    first = await imps.record_feedback("r1", "u1", "a", "click", None, 1.0, 5.0, 60, 10)
    again = await imps.record_feedback("r1", "u1", "a", "click", None, 7.0, 6.0, 60, 10)
    other = await imps.record_feedback("r1", "u1", "a", "purchase", None, 2.0, 7.0, 60, 10)
    assert first == (True, 1.0) and again == (False, 1.0) and other == (True, 2.0)
    history = (await store.users.get_user("u1")).history
    assert [(h["item_id"], h["event"]) for h in history] == [("a", "click"), ("a", "purchase")]


async def test_feedback_on_slate_validates_then_records(store):
    """The one call behind POST /v1/feedback: the same outcomes, in the same order, as
    reading the slate and recording separately; a refused event leaves nothing behind."""
    assert (await store.impressions.feedback_on_slate("r1", "a", "click", None, 1.0, 5.0, 60, 10)
            == FeedbackOutcome("unknown_request"))
    await store.impressions.log_impression(imp("r1"), ttl_s=60, shown_max=10)
    assert (await store.impressions.feedback_on_slate("r1", "zz", "click", None, 1.0, 5.0, 60, 10)
            == FeedbackOutcome("not_in_slate"))
    # neither refusal marked the event as delivered
    first = await store.impressions.feedback_on_slate("r1", "a", "click", None, 1.0, 5.0, 60, 10)
    again = await store.impressions.feedback_on_slate("r1", "a", "click", None, 7.0, 6.0, 60, 10)
    other = await store.impressions.feedback_on_slate("r1", "b", "purchase", None, 2.0, 7.0, 60, 10)
    assert first == FeedbackOutcome("accepted", 1.0)
    assert again == FeedbackOutcome("duplicate", 1.0)
    assert other == FeedbackOutcome("accepted", 2.0)
    history = (await store.users.get_user("u1")).history
    assert [(h["item_id"], h["event"], h["ts"]) for h in history] == [("a", "click", 5.0),
                                                                     ("b", "purchase", 7.0)]
    got = (await store.impressions.get_impressions(["r1"]))["r1"]
    assert got.rewards == {"a": 1.0, "b": 2.0}
    assert got.events == {"a": ["click"], "b": ["purchase"]}
    entries = await store.stream.read_stream("c1", 100)
    assert [(f["type"], f.get("item_id")) for _, f in entries] == [
        ("impression", None), ("feedback", "a"), ("feedback", "b")]


async def test_an_impression_keeps_what_the_learner_credits(store):
    """The arm that served a slate and the probability it was drawn with, and each
    slot's sources and depth, come back as logged: the arms' and sources' values are
    learned from them."""
    logged = imp("r1")
    logged.agents, logged.sources, logged.depths = [8, 8], [1, 3], [0, 17]
    logged.arm_propensity = 0.125
    await store.impressions.log_impression(logged, ttl_s=60, shown_max=10)
    got = (await store.impressions.get_impressions(["r1"]))["r1"]
    assert (got.agents, got.sources, got.depths) == ([8, 8], [1, 3], [0, 17])
    assert got.arm_propensity == 0.125
    await store.impressions.log_impression(imp("r2"), ttl_s=60, shown_max=10)  # none drawn: 1
    assert (await store.impressions.get_impressions(["r2"]))["r2"].arm_propensity == 1.0


async def test_displayed_items_are_marked_on_a_deferred_impression(store):
    """v1.1 defer_seen: the flag and the displayed items come back with the
    impression; marking is a union; an unknown impression is not created by it."""
    deferred = imp("r1", items=("a", "b", "c"))
    deferred.propensities, deferred.explored = [0.9] * 3, [False] * 3
    deferred.deferred = True
    await store.impressions.log_impression(deferred, ttl_s=60, shown_max=10)
    assert (await store.impressions.get_impressions(["r1"]))["r1"].seen == []
    assert await store.impressions.mark_seen("r1", ["a"])
    assert await store.impressions.mark_seen("r1", ["c", "a"])
    got = (await store.impressions.get_impressions(["r1"]))["r1"]
    assert got.deferred and sorted(got.seen) == ["a", "c"]
    assert not await store.impressions.mark_seen("nope", ["a"])
    assert await store.impressions.get_impressions(["nope"]) == {}
    await store.impressions.log_impression(imp("r2"), ttl_s=60, shown_max=10)
    assert not (await store.impressions.get_impressions(["r2"]))["r2"].deferred


async def test_batched_feedback_and_impressions_keep_their_order(store):
    """Concurrent requests' feedback and impressions are written in one call: each
    event gets the outcome it would get alone, a repeat within the batch is a
    duplicate of the earlier one, and a user's shown items keep their order."""
    first, second = imp("r1", items=("a", "b")), imp("r2", items=("c", "d"))
    second.ts = first.ts + 1
    await store.impressions.log_impressions([first, second], ttl_s=60, shown_max=10)
    assert [i for i, _ in (await store.users.get_user("u1")).shown] == ["a", "b", "c", "d"]
    outcomes = await store.impressions.feedback_on_slates([
        FeedbackEvent("r1", "a", "click", None, 1.0, 5.0),
        FeedbackEvent("r2", "a", "click", None, 1.0, 5.0),   # not in r2's slate
        FeedbackEvent("r9", "a", "click", None, 1.0, 5.0),   # unknown
        FeedbackEvent("r2", "d", "rating", 4.0, 0.6, 6.0),
        FeedbackEvent("r1", "a", "click", None, 3.0, 7.0),   # a repeat of the first
    ], ttl_s=60, history_max=10)
    assert outcomes == [FeedbackOutcome("accepted", 1.0), FeedbackOutcome("not_in_slate"),
                        FeedbackOutcome("unknown_request"), FeedbackOutcome("accepted", 0.6),
                        FeedbackOutcome("duplicate", 1.0)]
    history = (await store.users.get_user("u1")).history
    assert [(h["item_id"], h["event"], h["value"]) for h in history] == [
        ("a", "click", None), ("d", "rating", 4.0)]
    got = await store.impressions.get_impressions(["r1", "r2"])
    assert got["r1"].rewards == {"a": 1.0} and got["r2"].rewards == {"d": 0.6}
    # a refused event left no dedupe marker: once its slate is logged (an impression
    # held through an outage, say), the same event is accepted
    await store.impressions.log_impressions([imp("r9", items=("a",))], ttl_s=60, shown_max=10)
    again = await store.impressions.feedback_on_slates(
        [FeedbackEvent("r9", "a", "click", None, 1.0, 8.0)], 60, 10)
    assert again == [FeedbackOutcome("accepted", 1.0)]


async def test_expired_impressions_are_gone(store):
    await store.impressions.log_impression(imp("short"), ttl_s=1, shown_max=10)
    await asyncio.sleep(1.2)
    assert await store.impressions.get_impressions(["short"]) == {}
    assert await store.impressions.slate_of("short") is None


async def test_evaluation_log_is_bounded_ordered_and_erasable(store):
    records = [{"request_id": f"r{n}", "user_id": "gone" if n % 2 else "kept",
                "item_ids": ["a"], "propensities": [0.9], "rewards": [float(n)]}
               for n in range(6)]
    await store.impressions.append_log(records[:4], max_len=5)
    await store.impressions.append_log(records[4:], max_len=5)
    got = await store.impressions.read_log(100)
    assert [r["request_id"] for r in got] == ["r1", "r2", "r3", "r4", "r5"]
    assert got[-1]["rewards"] == [5.0]
    assert [r["request_id"] for r in await store.impressions.read_log(2)] == ["r4", "r5"]
    await store.users.delete_user("gone")
    assert [r["request_id"] for r in await store.impressions.read_log(100)] == ["r2", "r4"]


async def test_an_impression_carries_the_rewards_and_events_of_its_feedback(store):
    await store.impressions.log_impression(imp("r1"), 60, 10)
    await store.impressions.record_feedback("r1", "u1", "a", "click", None, 1.0, 5.0, 60, 10)
    await store.impressions.record_feedback("r1", "u1", "a", "purchase", None, 2.0, 6.0, 60, 10)
    await store.impressions.record_feedback("r1", "u1", "a", "click", None, 1.0, 7.0, 60,
                                            10)  # duplicate
    await store.impressions.record_feedback("r1", "u1", "x:y", "dwell", 30.0, 0.5, 8.0, 60, 10)
    got = (await store.impressions.get_impressions(["r1"]))["r1"]
    assert got.rewards == {"a": 3.0, "x:y": 0.5}
    assert {i: sorted(e) for i, e in got.events.items()} == {"a": ["click", "purchase"],
                                                            "x:y": ["dwell"]}
    # feedback for an impression that expired creates nothing
    await store.impressions.record_feedback("gone", "u1", "a", "click", None, 1.0, 5.0, 60, 10)
    assert await store.impressions.get_impressions(["gone"]) == {}


# -- the event stream (EventStream) --------------------------------------------------------


async def test_stream_delivers_once_and_redelivers_unacked(store):
    await store.impressions.log_impression(imp("r1"), 60, 10)
    await store.impressions.record_feedback("r1", "u1", "a", "click", None, 1.0, 5.0, 60, 10)
    entries = await store.stream.read_stream("c1", 100)
    assert [f["type"] for _, f in entries] == ["impression", "feedback"]
    assert entries[1][1]["item_id"] == "a" and float(entries[1][1]["reward"]) == 1.0
    assert await store.stream.read_stream("c1", 100) == []  # delivered once
    # a consumer that died reads its unacknowledged entries again
    pending = await store.stream.read_stream("c1", 100, pending=True)
    assert [e for e, _ in pending] == [e for e, _ in entries]
    await store.stream.ack([entries[0][0]])
    pending = await store.stream.read_stream("c1", 100, pending=True)
    assert [e for e, _ in pending] == [entries[1][0]]
    await store.stream.ack([entries[1][0]])
    assert await store.stream.read_stream("c1", 100, pending=True) == []


async def test_stream_survives_losing_its_consumer_group(backend):
    """Redis restarted without its data: reading recreates the group, nothing raises."""
    if backend[0] != "redis":
        pytest.skip("only Redis can lose its consumer group")
    store = RedisStore(backend[1]["redis_url"], backend[1]["key_prefix"])
    await store.impressions.log_impression(imp("before"), ttl_s=60, shown_max=10)
    assert len(await store.stream.read_stream("c1", 10)) == 1
    await store.r.delete(f"{backend[1]['key_prefix']}:{{model}}:events")  # stream and group gone
    await store.impressions.log_impression(imp("after"), ttl_s=60, shown_max=10)
    entries = await store.stream.read_stream("c1", 10)
    assert [f["request_id"] for _, f in entries] == ["after"]
    await store.close()


async def test_claiming_leaves_entries_that_are_not_idle_long_enough(store):
    await store.impressions.log_impression(imp("r1"), 60, 10)
    await store.stream.read_stream("busy", 100)
    assert await store.stream.claim_stream("other", 60.0, 100) == []
    assert len(await store.stream.claim_stream("other", 0.0, 100)) == 1
    assert await store.stream.read_stream("busy", 100, pending=True) == []


# -- the model registry: lease, weights, commits (ModelRegistry) ---------------------------


async def test_weights_and_stats(store):
    assert await store.registry.latest_version() == 0
    await store.registry.publish_weights(1, b"w1", {"updates": 5})
    await store.registry.publish_weights(2, b"w2", {"updates": 9, "feedback_learned": 3,
                                                    "pending_impressions": 4})
    assert await store.registry.latest_version() == 2
    assert await store.registry.get_weights(2) == b"w2"
    assert await store.registry.get_weights(1) == b"w1"
    stats = await store.registry.get_stats()
    assert stats["updates"] == 9 and stats["feedback_learned"] == 3
    assert stats["pending_impressions"] == 4


async def test_weight_versions_remember_their_parent_and_only_the_newest_are_kept(store):
    for v in range(1, 6):
        await store.registry.publish_weights(v, f"w{v}".encode(), {}, parent=v - 1, keep=3)
    assert [await store.registry.get_weights(v) for v in range(1, 6)] == [None, None, b"w3", b"w4",
                                                                          b"w5"]
    assert [await store.registry.weights_parent(v) for v in (5, 3, 1, 99)] == [4, 2, 0, 0]


async def test_one_lease_holder_at_a_time(store):
    assert await store.registry.lease_holder() is None
    assert await store.registry.hold_lease("l1", ttl_s=0.5)
    assert not await store.registry.hold_lease("l2", ttl_s=0.5)
    assert await store.registry.hold_lease("l1", ttl_s=0.5)  # renewal
    assert await store.registry.lease_holder() == "l1"
    await asyncio.sleep(0.7)  # the holder stopped renewing: the lease expires
    assert await store.registry.hold_lease("l2", ttl_s=5)
    assert not await store.registry.hold_lease("l1", ttl_s=5)
    await store.registry.release_lease("l1")  # not the holder: nothing happens
    assert await store.registry.lease_holder() == "l2"
    await store.registry.release_lease("l2")
    assert await store.registry.lease_holder() is None


async def test_only_the_lease_holder_commits_and_a_commit_is_whole(store):
    await store.impressions.log_impression(imp("r1"), 60, 10)
    await store.impressions.record_feedback("r1", "u1", "a", "click", None, 1.0, 5.0, 60, 10)
    entries = await store.stream.read_stream("dead", 100)
    assert len(entries) == 2
    record = {"request_id": "r1", "user_id": "u1", "rewards": [1.0, 0.0]}
    assert await store.registry.hold_lease("holder", ttl_s=30)
    # a learner that lost the lease writes nothing at all
    assert not await store.registry.commit_learning("stale", [e for e, _ in entries],
                                                    {"feedback_learned": 1}, [record], 10,
                                                    WeightsUpdate(1, b"w1"))
    assert await store.registry.latest_version() == 0
    assert await store.registry.get_weights(1) is None
    assert await store.registry.get_stats() == {} and await store.impressions.read_log(10) == []
    # the holder takes over the dead consumer's entries, learns, commits
    claimed = await store.stream.claim_stream("holder", 0.0, 100)
    assert [e for e, _ in claimed] == [e for e, _ in entries]
    assert await store.stream.read_stream("dead", 100, pending=True) == []
    assert await store.registry.commit_learning("holder", [e for e, _ in claimed],
                                                {"feedback_learned": 1, "version": 1}, [record], 10,
                                                WeightsUpdate(1, b"w1", parent=0))
    assert await store.registry.latest_version() == 1
    assert await store.registry.get_weights(1) == b"w1"
    assert (await store.registry.get_stats())["feedback_learned"] == 1
    assert await store.impressions.read_log(10) == [record]
    assert await store.stream.read_stream("holder", 100, pending=True) == []
    assert await store.stream.read_stream("holder", 100) == []
    # a commit without weights: counters and acknowledgements only
    assert await store.registry.commit_learning("holder", [], {"feedback_learned": 2}, [], 10)
    assert await store.registry.latest_version() == 1
    assert (await store.registry.get_stats())["feedback_learned"] == 2


# -- rate limiting (RateLimits) ------------------------------------------------------------


async def test_request_counts_are_per_bucket_and_per_window(store):
    assert [await store.limits.count_request("k1", 100, 60) for _ in range(3)] == [1, 2, 3]
    assert await store.limits.count_request("k2", 100, 60) == 1
    assert await store.limits.count_request("k1", 160, 60) == 1  # the next window starts at 1


# -- the Redis backend's connections and faults (Lifecycle) --------------------------------


async def test_unreachable_redis_raises_store_unavailable():
    s = RedisStore("redis://127.0.0.1:1/0", "x")
    with pytest.raises(StoreUnavailable):
        await s.ping()
    with pytest.raises(StoreUnavailable):
        await s.impressions.record_feedback("r", "u", "i", "click", None, 1.0, 0.0, 60, 10)
    await s.close()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0",
                                 "unix:///tmp/nothing.sock"])
def test_commands_go_out_as_redis_py_would_send_them(url):
    """A standalone store packs commands with hiredis (redis-py's asyncio client packs in
    Python); on every connection kind its URL selects, the bytes sent are redis-py's, and
    what Redis cannot take fails as redis-py fails."""
    import redis.asyncio as aioredis
    from redis.exceptions import DataError

    pool = RedisStore(url).r.connection_pool
    ours = pool.make_connection()
    theirs = aioredis.ConnectionPool.from_url(url).make_connection()
    assert isinstance(ours, type(theirs)) and type(ours) is not type(theirs)
    state = np.random.default_rng(0).random(1155).astype(np.float32).tobytes()
    for args in [("HSET", "p:imp:r1", "state", state, "ts", repr(time.time()), "version", 3),
                 ("ZADD", "z", 0.1 + 0.2, "a", -1e-300, "b", 2 ** 70, "c"),
                 ("SET", bytearray(b"k"), memoryview(b"v"), "EX", 5),
                 ("CONFIG GET", "maxmemory"), (b"CLIENT SETNAME", "n"), ("SET", "k", "é")]:
        try:
            sent = b"".join(theirs.pack_command(*args))
        except DataError:  # redis-py before 8 takes no bytearray; ours sends it as 8 does
            assert any(isinstance(a, bytearray) for a in args)
            continue
        assert b"".join(ours.pack_command(*args)) == sent
    assert (b"".join(ours.pack_commands([("GET", "a"), ("INCRBYFLOAT", "b", 1.5)]))
            == b"".join(theirs.pack_commands([("GET", "a"), ("INCRBYFLOAT", "b", 1.5)])))
    for bad in (None, True):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)


async def test_a_hung_redis_fails_calls_at_their_deadline_and_is_used_again_after():
    """A Redis that stops answering (paused, overloaded, behind a partition): each call
    fails with StoreUnavailable at the store's deadline, single commands and pipelines
    alike, instead of holding the request. Once it answers again so does the store,
    and no call reads a reply meant for a call that was cut off."""
    import os
    import shutil
    import signal
    import subprocess

    from tests.conftest import free_port, wait_port

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=10)
        s = RedisStore(f"redis://127.0.0.1:{port}/0", "hang", timeout_s=0.5)
        await s.embeddings.put_embedding("old", b"old value", 60)
        await s.users.add_event("u1", {"item_id": "i1", "event": "click", "ts": 1.0}, 10)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.embeddings.get_embedding("old")
            with pytest.raises(StoreUnavailable):
                await s.users.get_users(["u1", "u2"])
            with pytest.raises(StoreUnavailable):
                await s.impressions.log_impression(imp("during"), ttl_s=60, shown_max=10)
            assert time.monotonic() - started < 3.0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # paused between the dedupe marker and the feedback's writes: the writes and
        # the marker's release after them (past the call's deadline) both give up
        write_feedback = s.impressions._write_feedback

        async def pause_then_write(*args):
            os.kill(proc.pid, signal.SIGSTOP)
            await write_feedback(*args)

        s.impressions._write_feedback = pause_then_write
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(s.impressions.record_feedback(
                    "r", "u9", "i9", "click", None, 1.0, 0.0, 60, 10), 10)
            assert time.monotonic() - started < 3.0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            del s.impressions._write_feedback
        await s.embeddings.put_embedding("new", b"new value", 60)
        assert await s.embeddings.get_embedding("new") == b"new value"
        users = await s.users.get_users(["u1", "u2"])
        assert [h["item_id"] for h in users["u1"].history] == ["i1"] and not users["u2"].history
        assert await s.embeddings.get_embedding("old") == b"old value"
        await s.close()
    finally:
        proc.terminate()
        proc.wait(10)
