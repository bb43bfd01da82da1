"""The Redis backend's users: histories, shown items, erasure."""

from __future__ import annotations

import time

import orjson

from app.store.base import UserData, UserStore
from app.store.redis_core import ERASED_KEPT_S, GROUP, RedisRole, _guard


class RedisUsers(RedisRole, UserStore):
    """A user's history and shown items expire ``user_ttl_s`` after their last write."""

    @_guard
    async def get_user(self, user_id: str) -> UserData:
        return (await self.get_users([user_id]))[user_id]

    @_guard
    async def get_users(self, user_ids: list[str]) -> dict[str, UserData]:
        pipe = self.r.pipeline(transaction=False)
        for u in user_ids:
            pipe.lrange(self._user(u, "hist"), 0, -1)
            pipe.lrange(self._user(u, "shown"), 0, -1)
        replies = await pipe.execute()
        out = {}
        for n, u in enumerate(user_ids):
            hist, shown = replies[2 * n], replies[2 * n + 1]
            shown_pairs = []
            for raw in shown:
                item_id, ts = raw.decode().rsplit("|", 1)
                shown_pairs.append((item_id, float(ts)))
            out[u] = UserData([orjson.loads(h) for h in hist], shown_pairs)
        return out

    @_guard
    async def add_event(self, user_id: str, entry: dict, max_len: int) -> None:
        key = self._user(user_id, "hist")
        pipe = self.r.pipeline(transaction=False)  # one key: the order is kept
        pipe.rpush(key, orjson.dumps(entry))
        pipe.ltrim(key, -max_len, -1)
        pipe.expire(key, self.user_ttl_s)
        await pipe.execute()

    @_guard
    async def delete_user(self, user_id: str) -> None:
        # Tombstones first: a feedback write racing this erasure, and a closed impression
        # already in the learner's backlog for the evaluation log, are both refused by
        # them (the history script and the commit script check), so nothing of the user
        # comes back once this call returns.
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self._user(user_id, "erased"), repr(now), ex=ERASED_KEPT_S)
        pipe.zadd(self._model("erased"), {user_id: now})
        pipe.zremrangebyscore(self._model("erased"), "-inf", now - ERASED_KEPT_S)
        await pipe.execute()
        imps_key, old_key = self._user(user_id, "impz"), self._user(user_id, "imps")
        rids = [r.decode() for r in await self.r.zrange(imps_key, 0, -1)]
        if await self.r.type(old_key) == b"set":  # written by releases before the ZSET
            rids += [r.decode() for r in await self.r.smembers(old_key)]
        await self.r.delete(self._user(user_id, "hist"), self._user(user_id, "shown"), imps_key,
                            old_key)
        if rids:
            await self.core.delete_each([self._imp(rid) for rid in rids])
        # Logged events of the user still waiting in the stream are erased too,
        # and so are the user's records in the evaluation log.
        await self.core.ensure_group()
        doomed = [e async for e, f in self.core.scan_stream(self._stream)
                  if f.get(b"user_id", b"").decode() == user_id]
        logged = [e async for e, f in self.core.scan_stream(self._log)
                  if f.get(b"user_id", b"").decode() == user_id]
        pipe = self.r.pipeline(transaction=False)
        if doomed:
            pipe.xack(self._stream, GROUP, *doomed)
            pipe.xdel(self._stream, *doomed)
        if logged:
            pipe.xdel(self._log, *logged)
        await pipe.execute()

