"""Persistence behind one interface, with an embedded and a Redis backend."""

from app.store.base import Impression, ItemRecord, Store, StoreUnavailable, UserData

__all__ = ["Impression", "ItemRecord", "Store", "StoreUnavailable", "UserData", "make_store"]


def make_store(settings) -> Store:
    """The Redis backend when ``RECSVC_REDIS_URL`` is set, else the embedded one."""
    if settings.redis_url:
        from app.store.redis_store import RedisStore

        return RedisStore(settings.redis_url, prefix=settings.key_prefix,
                          max_connections=settings.redis_max_connections,
                          cluster=settings.redis_cluster, user_ttl_s=settings.user_ttl_s,
                          stream_max=settings.stream_max)
    from app.store.memory import MemoryStore

    return MemoryStore(user_ttl_s=settings.user_ttl_s)
