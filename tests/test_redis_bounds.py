"""What only the Redis backend shows: every key it writes has a bound."""

import asyncio
import time

from app.store import Impression
from app.store.redis_store import RedisStore


async def test_every_user_key_has_a_bound(redis_url, redis_prefix):
    """A user's history and shown items expire after ``user_ttl_s`` without writes, the
    impression ids are pruned as the impressions expire, and the event stream is
    trimmed at ``stream_max`` (at 3b796b0 none had a TTL, and one user's impression set
    held 1,942 ids while 561 impressions still existed)."""
    s = RedisStore(redis_url, redis_prefix, user_ttl_s=3600, stream_max=100)
    now = time.time()

    def imp(rid: str, ts: float, user: str = "u") -> Impression:
        return Impression(rid, user, ts, 1, b"\0" * 16, ["a"], [0.9], [False])

    # served two minutes ago, held through an outage and logged now: stored 60 s more
    await s.impressions.log_impressions([imp("late", now - 120)], ttl_s=60, shown_max=10)
    await s.impressions.log_impressions([imp("new", now)], ttl_s=60, shown_max=10)
    await s.users.add_event("u", {"item_id": "a", "event": "click", "ts": now}, 10)
    for key in ("hist", "shown"):
        assert 0 < await s.r.ttl(s._user("u", key)) <= 3600
    ids = [r.decode() for r in await s.r.zrange(s._user("u", "impz"), 0, -1)]
    assert ids == ["late", "new"]  # every impression still stored
    assert 0 < await s.r.ttl(s._user("u", "impz")) <= 60
    # and only those: an expired one is pruned at the next impression
    await s.impressions.log_impressions([imp("gone", now, "w")], ttl_s=1, shown_max=10)
    await asyncio.sleep(1.1)
    await s.impressions.log_impressions([imp("kept", time.time(), "w")], ttl_s=1, shown_max=10)
    assert [r.decode() for r in await s.r.zrange(s._user("w", "impz"), 0, -1)] == ["kept"]
    await s.users.delete_user("u")  # the erasure finds the late one too
    assert not await s.impressions.get_impressions(["late", "new"])
    for n in range(300):
        await s.impressions.log_impressions([Impression(f"s{n}", "v", now, 1, b"\0" * 16, [],
                                                        [], [])], ttl_s=60, shown_max=10)
    assert await s.stream.stream_length() <= 200  # trimmed near 100 (approximately: whole nodes)
    await s.close()
