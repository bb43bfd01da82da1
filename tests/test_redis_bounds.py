"""What only the Redis backend shows: every key it writes has a bound."""

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
    old = Impression("old", "u", now - 120, 1, b"\0" * 16, ["a"], [0.9], [False])
    await s.log_impressions([old], ttl_s=60, shown_max=10)  # expired a minute ago
    await s.log_impressions([Impression("new", "u", now, 1, b"\0" * 16, ["b"], [0.9],
                                        [False])], ttl_s=60, shown_max=10)
    await s.add_event("u", {"item_id": "a", "event": "click", "ts": now}, 10)
    for key in ("hist", "shown"):
        assert 0 < await s.r.ttl(s._user("u", key)) <= 3600
    assert [r.decode() for r in await s.r.zrange(s._user("u", "impz"), 0, -1)] == ["new"]
    assert 0 < await s.r.ttl(s._user("u", "impz")) <= 60
    for n in range(300):
        await s.log_impressions([Impression(f"s{n}", "v", now, 1, b"\0" * 16, [],
                                            [], [])], ttl_s=60, shown_max=10)
    assert await s.stream_length() <= 200  # trimmed near 100 (approximately: whole nodes)
    await s.close()
