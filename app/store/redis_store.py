"""The Redis backend (redis-py asyncio with hiredis), standalone or Redis Cluster.

One client (``RedisCore``: the connection, the key layout, the deadline of every call)
and a class per role of the store (``app.store.base``), each in its own module:

  redis_catalog.py       the catalog and the context-embedding cache
  redis_users.py         users' histories and shown items, erasure
  redis_impressions.py   logged slates, feedback on them (exactly once), evaluation log
  redis_learning.py      the event stream and the model registry (lease, weights, commit)
  this module            the rate limit, and ``RedisStore``, which puts them together

The key layout is in ``redis_core``'s docstring.
"""

from __future__ import annotations

from app.store.base import RateLimits, Store
from app.store.redis_catalog import RedisCatalog, RedisEmbeddings
from app.store.redis_core import RedisCore, RedisRole, _guard
from app.store.redis_impressions import RedisImpressions
from app.store.redis_learning import RedisRegistry, RedisStream
from app.store.redis_users import RedisUsers


class RedisRateLimits(RedisRole, RateLimits):
    @_guard
    async def count_request(self, bucket: str, window_start: int, window_s: int) -> int:
        key = f"{self.p}:rl:{bucket}:{window_start}"
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_s + 1)
        count, _ = await pipe.execute()
        return int(count)


class RedisStore(RedisCore, Store):
    """Every role on one Redis (or Redis Cluster) client."""

    def __init__(self, url: str, prefix: str = "recsvc", max_connections: int = 64,
                 cluster: bool = False, timeout_s: float = 5.0,
                 user_ttl_s: int = 30 * 86_400, stream_max: int = 1_000_000) -> None:
        super().__init__(url, prefix, max_connections, cluster, timeout_s, user_ttl_s,
                         stream_max)
        self.catalog = RedisCatalog(self)
        self.embeddings = RedisEmbeddings(self)
        self.users = RedisUsers(self)
        self.impressions = RedisImpressions(self)
        self.stream = RedisStream(self)
        self.registry = RedisRegistry(self)
        self.limits = RedisRateLimits(self)


__all__ = ["RedisStore"]
