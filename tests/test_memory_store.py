"""The embedded store frees what expires: memory stays flat under a steady load."""

import time

import numpy as np

from app.clock import SimulatedClock
from app.store import Impression
from app.store.expiry import ExpiringMap
from app.store.memory import MemoryStore


def _imp(rid: str, user: str) -> Impression:
    return Impression(rid, user, time.time(), 1, np.ones(5, dtype=np.float32).tobytes(),
                      ["a", "b"], [0.9, 0.5], [False, False])


async def test_expired_impressions_markers_and_embeddings_are_freed():
    """20,000 slates with a 1 s TTL, a click on each, and as many cached embeddings:
    once the TTL has passed they read as absent, and the next write frees them (at
    3b796b0 every entry stayed: 117 MB for 20,000 slates, never returned)."""
    store = MemoryStore()
    for n in range(20_000):
        await store.impressions.log_impression(_imp(f"r{n}", f"u{n % 500}"), 1, 50)
        await store.impressions.record_feedback(f"r{n}", f"u{n % 500}", "a", "click", None, 1.0,
                                                time.time(), 1, 50)
        await store.embeddings.put_embedding(f"e{n}", b"\0" * 16, 1)
    time.sleep(1.1)
    assert await store.impressions.get_impressions(["r0", "r19999"]) == {}
    await store.impressions.log_impression(_imp("fresh", "u1"), 1, 50)  # any write frees the rest
    await store.embeddings.put_embedding("fresh", b"\0" * 16, 1)
    assert len(store._imps) == 1 and len(store._emb) == 1 and len(store._dedupe) == 0
    assert sum(len(ids) for ids in store._user_imps.values()) == 1


async def test_users_expire_after_their_last_write():
    clock = SimulatedClock()
    store = MemoryStore(clock, user_ttl_s=100)
    await store.users.add_event("gone", {"item_id": "a", "event": "click", "ts": 0}, 50)
    await store.users.add_event("kept", {"item_id": "a", "event": "click", "ts": 0}, 50)
    clock.advance(60)
    await store.impressions.log_impression(_imp("r1", "kept"), 1000, 50)  # kept is active again
    clock.advance(60)
    assert (await store.users.get_user("gone")).history == []
    assert len((await store.users.get_user("kept")).history) == 1
    assert "gone" not in store._history and "gone" not in store._shown


async def test_memory_is_flat_at_a_steady_load():
    """A steady stream of slates with a 2 s TTL on simulated time: after the first TTL
    the number of entries held stops growing."""
    clock = SimulatedClock()
    store = MemoryStore(clock, user_ttl_s=5)
    held = []
    for n in range(30_000):
        await store.impressions.log_impression(_imp(f"r{n}", f"u{n}"), 2, 50)
        clock.advance(0.001)  # 1,000 slates per second
        if n % 5_000 == 4_999:
            held.append(sum(store.held().values()) - store.held()["stream"])
    assert max(held[1:]) <= 1.05 * held[1]


def test_expiring_map_rewrites_move_the_expiry_and_the_heap_stays_bounded():
    m: ExpiringMap[str, int] = ExpiringMap()
    for n in range(10_000):
        m.put("k", n, float(n))  # the same key, written again and again
    assert len(m._heap) < 5_000
    assert m.purge(9_999.5) == 1 and len(m) == 0
    m.put("a", 1, 10.0)
    m.put("a", 2, 20.0)
    assert m.purge(15.0) == 0 and m.get("a", 15.0) == 2
