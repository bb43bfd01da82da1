"""The learner under store failures: a round that fails after reading its events loses
none of them, and a round that fails after learning does not learn them twice."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from app.server.api import create_app
from app.settings import Settings
from app.store import StoreUnavailable
from app.store.memory import MemoryRegistry, MemoryStore, MemoryUsers
from tests.test_api import FAST, MOVIES, wait_for


class FlakyUsers(MemoryUsers):
    async def get_users(self, user_ids):
        if self.m.fail == "get_users":  # after reading the events, before learning
            await self.m.maybe_fail()
        return await super().get_users(user_ids)


class FlakyRegistry(MemoryRegistry):
    async def commit_learning(self, owner, acks, stats, log_records, log_max, weights=None):
        if self.m.fail == "commit_learning" and log_records:  # after learning, before commit
            await self.m.maybe_fail()
        return await super().commit_learning(owner, acks, stats, log_records, log_max, weights)


class FlakyStore(MemoryStore):
    """The embedded store, failing the chosen call once (as a Redis hiccup would)."""

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail, self.failed = fail, 0
        self.users = FlakyUsers(self)
        self.registry = FlakyRegistry(self)

    async def maybe_fail(self):
        if not self.failed:
            self.failed += 1
            raise StoreUnavailable("injected")


@pytest.mark.parametrize("fail", ["get_users", "commit_learning"])
def test_a_failed_round_loses_nothing_and_learns_nothing_twice(encoder, fail):
    store = FlakyStore(fail)
    settings = Settings(**{**FAST, "reward_wait_s": 2.0})  # every click lands in its window
    with TestClient(create_app(settings, store=store, encoder=encoder)) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        slates = [c.post("/v1/recommend", json={"user_id": f"u{n}", "k": 3}).json()
                  for n in range(4)]
        for slate in slates:
            r = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                             "item_id": slate["items"][0]["item_id"],
                                             "event": "click"})
            assert r.status_code == 202
        wait_for(lambda: store.failed == 1)
        model = wait_for(lambda: (m := c.get("/v1/model").json())["pending_impressions"] == 0
                         and m["feedback_learned"] >= 4 and m)
        assert model["feedback_learned"] == 4
        log = c.get("/v1/log").json()["records"]
        assert sorted(r["request_id"] for r in log) == sorted(s["request_id"] for s in slates)
        assert all(r["rewards"] == [1.0, 0.0, 0.0] for r in log), log  # the click, once
        assert c.app.state.learner.transitions == 4 * 3  # each slot learned exactly once


async def test_the_lease_holder_claims_entries_stuck_on_a_deposed_learner(monkeypatch):
    """A learner that lost the lease may read entries after the holder's takeover claim;
    it never commits them. The holder's periodic sweep claims and learns them."""
    import time

    import numpy as np

    from app.learner import worker as learner_worker
    from app.learner.worker import LearnerWorker
    from app.store import Impression
    from models.index import CandidateIndex
    from models.state import StateLayout

    monkeypatch.setattr(learner_worker, "SWEEP_EVERY_S", 0.0)
    store = MemoryStore()
    settings = Settings(reward_wait_s=0.0, lease_ttl_s=0.2, publish_interval_s=0.0,
                        replay_size=1000, replay_prefault=False, seed=0)
    layout = StateLayout(8)
    index = CandidateIndex(8)
    index.upsert(["a", "b"], np.eye(8, dtype=np.float32)[:2])
    holder = LearnerWorker(settings, store, index, layout, "cpu", consumer="holder")
    assert await holder.hold_lease() and holder.active
    state = np.zeros(layout.size, dtype=np.float32).tobytes()
    await store.impressions.log_impression(Impression("r1", "u1", time.time(), 0, state, ["a", "b"],
                                                      [0.9, 0.9], [False, False]), 60, 10)
    assert len(await store.stream.read_stream("deposed", 10)) == 1  # read, never to be committed
    await holder.step()
    assert holder.transitions == 0  # not idle long enough to be called stuck
    await asyncio.sleep(0.5)  # > reward window + 2 lease TTLs + publish interval
    assert await holder.hold_lease()  # as every round of the loop does
    await holder.step()
    assert holder.transitions == 2
    assert [r["request_id"] for r in await store.impressions.read_log(10)] == ["r1"]
    assert await store.stream.read_stream("deposed", 10, pending=True) == []
    assert await store.stream.read_stream("holder", 10, pending=True) == []  # committed


class RepeatingStore(MemoryStore):
    """Feedback's stream entry appended twice, as a client's retry of a still-pending
    event redoes the writes (a Redis stream entry is not idempotent)."""

    def _append(self, fields: dict[str, str]) -> None:
        super()._append(fields)
        if fields.get("type") == "feedback":
            super()._append(dict(fields))


def test_a_repeated_feedback_entry_is_learned_once(encoder):
    """Both entries arrive in the same read: the event is one transition, counted once
    (before, both became transitions and feedback_learned counted 2 per click)."""
    store = RepeatingStore()
    settings = Settings(**{**FAST, "reward_wait_s": 2.0})
    with TestClient(create_app(settings, store=store, encoder=encoder)) as c:
        c.post("/v1/items", json={"items": [{"item_id": i, "text": t} for i, t in MOVIES]})
        slates = [c.post("/v1/recommend", json={"user_id": f"u{n}", "k": 3}).json()
                  for n in range(3)]
        for slate in slates:
            assert c.post("/v1/feedback", json={
                "request_id": slate["request_id"], "item_id": slate["items"][0]["item_id"],
                "event": "click"}).status_code == 202
        model = wait_for(lambda: (m := c.get("/v1/model").json())["pending_impressions"] == 0
                         and m["feedback_learned"] >= 3 and m)
        assert model["feedback_learned"] == 3
        assert c.app.state.learner.transitions == 3 * 3
