"""The Redis backend (redis-py asyncio with hiredis), standalone or Redis Cluster.

Key layout, with hash tags wherever several keys are touched together so that
Redis Cluster works (the learner's keys share the tag ``{model}``, so that its
commit is one script on one node):

  {p}:item:{id}                 hash: text, tags, available, emb, text_key
  {p}:items                     set of item ids
  {p}:catalog                   stream of catalog changes (origin, item ids), trimmed to
                                about 10,000 entries; replicas follow it
  {p}:emb:{model}:{hash}        cached context embedding (TTL)
  {p}:user:{<uid>}:hist|shown   a user's history and shown items (TTL: RECSVC_USER_TTL_S
                                after the last write)
  {p}:user:{<uid>}:impz         a user's impression ids scored by expiry, pruned as they
                                expire (":imps", a set, in releases before it)
  {p}:user:{<uid>}:erased       when the user was last erased (a day's TTL): feedback on
                                a slate served before it does not bring the history back
  {p}:imp:{rid}                 logged impression, with an e:{item}:{event} field holding
                                the reward of each accepted feedback event (TTL)
  {p}:fb:{rid}:{item}:{event}   feedback dedupe marker: "pending", then the reward (TTL)
  {p}:{model}:events            stream of impressions and feedback, consumer group "learners"
  {p}:{model}:log               capped stream of closed impressions, for off-policy evaluation
  {p}:{model}:lease             the learner lease: holder's id (PX TTL)
  {p}:{model}:erased            users erased in the last day, scored by when: closed
                                impressions of theirs still in a learner's backlog are
                                left out of the evaluation log
  {p}:{model}:version|w:N|parent:N|stats   weights versions, the version each replaced
                                (for rollback), learner counters
  {p}:rl:{key id}:{window}      per-key request count of one rate-limit window (TTL)

Acknowledged stream entries are deleted, so the stream holds only unprocessed work;
it is trimmed at ``stream_max`` entries, a bound reached only when no learner
consumes it for long (``recsvc_stream_backlog`` alerts well before). Every key has a
TTL or a cap.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Iterable
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc

from app.store.base import (
    CatalogChange,
    FeedbackEvent,
    FeedbackOutcome,
    Impression,
    ItemRecord,
    Store,
    StoreUnavailable,
    StreamEntry,
    UserData,
    VersionConflict,
    WeightsUpdate,
    change_id_key,
)

GROUP = "learners"
# erasure tombstones are kept this long: longer than any feedback write or learner
# commit can take to land after the erasure it races
ERASED_KEPT_S = 86_400
# a feedback dedupe marker whose writes have not all landed yet (see feedback_on_slates)
PENDING = b"pending"

# KEYS: a user's history, the user's erasure tombstone; ARGV: entry (JSON), its event
# key, max length, the time of the slate it is feedback on, the history's TTL. Appends
# the entry unless an entry with the same key is among the last ``max length`` already
# (a retried write does not add the same event twice), or the user was erased after
# that slate was served (feedback racing the erasure does not bring the history back).
_APPEND_ONCE = """
local erased = redis.call('GET', KEYS[2])
if erased and tonumber(erased) >= tonumber(ARGV[4]) then return 0 end
local key = '"key":' .. cjson.encode(ARGV[2])
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[3]), -1)) do
  if string.find(entry, key, 1, true) then return 0 end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
CATALOG_CHANGES_KEPT = 10_000
# Replies that mean "unavailable", not "wrong": the connection or the server is down,
# loading, out of memory (maxmemory with noeviction), a replica after a failover
# (READONLY), a replica whose primary is down, a cluster mid-resharding (TRYAGAIN).
_DOWN = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError,
         rexc.ClusterDownError, rexc.OutOfMemoryError, rexc.ReadOnlyError,
         rexc.MasterDownError, rexc.TryAgainError, OSError)
# Plain error replies that refuse writes for a while, not for a wrong command: too few
# replicas for ``min-replicas-to-write`` (NOREPLICAS), a failed RDB save with
# ``stop-writes-on-bgsave-error`` (MISCONF, as on a full disk). Matched anywhere in the
# message: a pipeline or a script prefixes its own words to the reply.
_REFUSED = re.compile(r"\b(NOREPLICAS|MISCONF)\b")

_HOLD_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Mark items of a stored impression displayed (fields s:{item}); never re-creates one
# that expired (it would have no TTL). KEYS: the impression; ARGV: field, 1, field, 1...
_MARK_SEEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, events, stats, log, version, w:N, parent:N, w:N-keep, parent:N-keep, erased
# ARGV: owner ('' = no lease check: a rollback through the API), group, log max,
#       n acks, ids..., n stats, k, v..., n log records, (uid, ts, json)..., has weights,
#       blob, N,
#       parent, and last the version that must be the latest ('' = no check)
# Returns 1; 0 (nothing written) when the lease is not the owner's; 2 (nothing written)
# when the latest version is not the expected one. Acknowledging comes first: if it
# fails, nothing else is written.
_COMMIT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[#ARGV] ~= '' and tonumber(redis.call('GET', KEYS[5]) or '0') ~= tonumber(ARGV[#ARGV])
then return 2 end
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for j = i, i + n - 1, 500 do
  local last = math.min(j + 499, i + n - 1)
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, j, last))
  redis.call('XDEL', KEYS[2], unpack(ARGV, j, last))
end
i = i + n
n = tonumber(ARGV[i]); i = i + 1
for j = i, i + 2 * n - 1, 2 do redis.call('HSET', KEYS[3], ARGV[j], ARGV[j + 1]) end
i = i + 2 * n
n = tonumber(ARGV[i]); i = i + 1
for j = i, i + 3 * n - 1, 3 do
  local erased = redis.call('ZSCORE', KEYS[10], ARGV[j])
  if not erased or tonumber(erased) < tonumber(ARGV[j + 1]) then
    redis.call('XADD', KEYS[4], 'MAXLEN', '=', ARGV[3], '*', 'user_id', ARGV[j], 'json',
               ARGV[j + 2])
  end
end
i = i + 3 * n
if ARGV[i] == '1' then
  redis.call('SET', KEYS[6], ARGV[i + 1])
  redis.call('SET', KEYS[7], ARGV[i + 3])
  redis.call('DEL', KEYS[8], KEYS[9])
  redis.call('SET', KEYS[5], ARGV[i + 2])
end
return 1
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counted(values: Iterable) -> list:
    values = list(values)
    return [len(values), *values]


def _events_of(h: dict[bytes, bytes]) -> dict[str, list[str]]:
    """Item -> event types, from an impression hash's ``e:{item}:{event}`` fields (item
    ids may hold ':', event names never do)."""
    out: dict[str, list[str]] = {}
    for k in h:
        if k.startswith(b"e:"):
            item_id, event = k[2:].decode().rsplit(":", 1)
            out.setdefault(item_id, []).append(event)
    return out


def _rewards_of(h: dict[bytes, bytes]) -> dict[str, float]:
    """Item -> the sum of its accepted feedback's rewards. Each ``e:{item}:{event}``
    field holds its event's reward; impressions written before that held ``r:{item}``
    sums (and 1 in the ``e:`` fields), which are read as they are."""
    old = {k[2:].decode(): float(v) for k, v in h.items() if k.startswith(b"r:")}
    if old:
        return old
    out: dict[str, float] = {}
    for k, v in h.items():
        if k.startswith(b"e:"):
            item_id = k[2:].decode().rsplit(":", 1)[0]
            out[item_id] = out.get(item_id, 0.0) + float(v)
    return out


def _guard(fn):
    """Turn connection-level failures into StoreUnavailable (the API answers 503), and
    bound the whole call, every round trip in it, by the store's ``timeout_s``.

    One deadline per call instead of redis-py's socket timeout, which arms a timer for
    every reply it reads, one per command of a pipeline (about 6% of the event loop's
    GIL time under feedback load). A call cut off by its deadline disconnects the
    connection it was reading from (redis-py's handling of a cancelled read), so the
    next call never reads a stale reply."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            async with asyncio.timeout(self.timeout_s):
                return await fn(self, *args, **kwargs)
        except _DOWN as exc:  # TimeoutError, the deadline's, is an OSError
            if isinstance(exc, rexc.ReadOnlyError):
                # a failover made this server a replica: reconnect, so the address
                # (a DNS name, a service) can lead to the new primary
                await self.reconnect()
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except rexc.ResponseError as exc:
            if _REFUSED.search(str(exc)):
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


class _HiredisPacking:
    """Packs commands with hiredis's C packer instead of redis-py's Python one.

    redis-py's asyncio connections pack every argument in Python (its sync client
    already packs with hiredis): an impression's seven commands took 62 us to pack on
    this machine, 21 us with hiredis, on the event loop of every recommendation. The
    bytes sent are the same (floats are written as ``repr`` writes them). A Redis
    Cluster client keeps redis-py's packing (its nodes make their own connections)."""

    def pack_command(self, *args) -> list[bytes]:
        if isinstance(args[0], str):  # "CONFIG GET" and the like: split as redis-py does
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # hiredis takes no bytearray: as bytes, as redis-py sends it
            pass
        try:
            as_bytes: Any = tuple(bytes(a) if isinstance(a, bytearray) else a for a in args)
            return [hiredis.pack_command(as_bytes)]
        except TypeError as exc:  # None, a bool, ...: redis-py's error for them
            raise rexc.DataError(str(exc)) from exc


def _packing_with_hiredis(pool: aioredis.ConnectionPool) -> aioredis.ConnectionPool:
    """Make the pool's connections (of the class its URL chose: TCP, TLS or a Unix
    socket) pack commands with hiredis; call before the pool makes a connection."""
    base = pool.connection_class
    pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    return pool


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = "recsvc", max_connections: int = 64,
                 cluster: bool = False, timeout_s: float = 5.0,
                 user_ttl_s: int = 30 * 86_400, stream_max: int = 1_000_000) -> None:
        """``cluster``: ``url`` names any node of a Redis Cluster. ``timeout_s``: the
        longest any call may take before it fails with ``StoreUnavailable``.
        ``user_ttl_s``: a user's history and shown items expire this long after their
        last write. ``stream_max``: the event stream is trimmed to about this many
        entries, a bound for when no learner consumes it (``stream_length`` is the
        backlog to alert on long before)."""
        self.url = url
        self.p = prefix
        self.timeout_s = timeout_s
        self.user_ttl_s = user_ttl_s
        self.stream_max = stream_max
        if cluster:
            self.r = aioredis.RedisCluster.from_url(
                url, max_connections=max_connections, decode_responses=False,
                socket_timeout=timeout_s, socket_connect_timeout=min(2.0, timeout_s))
        else:
            # A blocking pool: under a burst, a call waits (within its deadline) for a
            # free connection instead of failing at once with "Too many connections".
            # No socket timeout: every call has one deadline (_guard).
            pool = _packing_with_hiredis(aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout_s,
                decode_responses=False, socket_timeout=None, socket_connect_timeout=2,
                health_check_interval=10))
            self.r = aioredis.Redis(connection_pool=pool)
        self._hold = self.r.register_script(_HOLD_LEASE)
        self._release = self.r.register_script(_RELEASE_LEASE)
        self._commit = self.r.register_script(_COMMIT)
        self._mark_seen = self.r.register_script(_MARK_SEEN)
        self._group_ready = False

    # keys
    def _item(self, i: str) -> str:
        return f"{self.p}:item:{i}"

    def _user(self, u: str, part: str) -> str:
        return f"{self.p}:user:{{{u}}}:{part}"

    def _imp(self, rid: str) -> str:
        return f"{self.p}:imp:{rid}"

    @property
    def _stream(self) -> str:
        return self._model("events")

    @property
    def _log(self) -> str:
        return self._model("log")

    @property
    def _catalog(self) -> str:
        return f"{self.p}:catalog"

    def _model(self, part: str) -> str:
        return f"{self.p}:{{model}}:{part}"

    async def close(self) -> None:
        if isinstance(self.r, aioredis.RedisCluster):
            await self.r.aclose()
        else:
            await self.r.aclose(close_connection_pool=True)

    @_guard
    async def ping(self) -> bool:
        return bool(await self.r.ping())

    @_guard
    async def stream_length(self) -> int:
        """Entries in the event stream: acknowledged ones are deleted, so this is the
        work no learner has committed yet."""
        return int(await self.r.xlen(self._stream))

    @_guard
    async def check_writable(self) -> None:
        """A write that expires: PING answers on a server that refuses every write (out
        of memory, a replica after a failover), this does not."""
        await self.r.set(f"{self.p}:probe", b"1", ex=60)

    async def reconnect(self) -> None:
        """Drop every connection, so the next calls connect afresh: after a failover the
        address leads to the new primary, and a connection kept to the old one (now a
        replica, answering READONLY) would be kept forever otherwise."""
        try:
            if isinstance(self.r, aioredis.RedisCluster):
                await self.r.aclose()  # nodes and slots are looked up again on next use
            else:
                await self.r.connection_pool.disconnect(inuse_connections=True)
        except Exception:  # noqa: BLE001 - best effort: the next call reconnects anyway
            pass

    # catalog
    def _announce(self, pipe, origin: str, item_ids: list[str]) -> None:
        pipe.xadd(self._catalog, {"origin": origin, "ids": orjson.dumps(item_ids)},
                  maxlen=CATALOG_CHANGES_KEPT, approximate=True)

    @_guard
    async def put_items(self, items: list[ItemRecord], origin: str = "") -> int:
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hset(self._item(it.item_id), mapping={
                "text": it.text, "tags": orjson.dumps(it.tags), "available": int(it.available),
                "emb": it.embedding, "text_key": it.text_key})
        pipe.sadd(f"{self.p}:items", *[it.item_id for it in items])
        pipe.scard(f"{self.p}:items")
        self._announce(pipe, origin, [it.item_id for it in items])
        return int((await pipe.execute())[-2])

    @_guard
    async def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]:
        if not item_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for i in item_ids:
            pipe.hgetall(self._item(i))
        out = {}
        for i, h in zip(item_ids, await pipe.execute(), strict=True):
            if h:
                out[i] = ItemRecord(i, h[b"text"].decode(), orjson.loads(h[b"tags"]),
                                    bool(int(h[b"available"])), h[b"emb"],
                                    h[b"text_key"].decode())
        return out

    @_guard
    async def delete_item(self, item_id: str, origin: str = "") -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self._item(item_id))
        pipe.srem(f"{self.p}:items", item_id)
        self._announce(pipe, origin, [item_id])
        deleted, _, _ = await pipe.execute()
        return bool(deleted)

    async def _catalog_info(self) -> dict | None:
        try:
            return await self.r.xinfo_stream(self._catalog)
        except rexc.ResponseError:  # no change was ever made
            return None

    @_guard
    async def last_catalog_change(self) -> str:
        info = await self._catalog_info()
        return _text(info["last-generated-id"]) if info else "0"

    @_guard
    async def catalog_changes(self, after: str, count: int = 1000,
                              ) -> tuple[list[CatalogChange], bool]:
        info = await self._catalog_info()
        if info is None:
            return [], True
        # Trimming drops the oldest entries: when some were ever dropped and the oldest
        # left is newer than ``after``, changes after ``after`` may be among them.
        # (Conservative: a reader exactly at the boundary reloads once for nothing.)
        trimmed = int(info["entries-added"]) > int(info["length"])
        first = info.get("first-entry")
        complete = not trimmed or (first is not None and
                                   change_id_key(_text(first[0])) <= change_id_key(after))
        raw = await self.r.xrange(self._catalog, min=f"({after}", max="+", count=count)
        return [(e.decode(), f[b"origin"].decode(), orjson.loads(f[b"ids"]))
                for e, f in raw], complete

    @_guard
    async def catalog_size(self) -> int:
        return int(await self.r.scard(f"{self.p}:items"))

    @_guard
    async def all_item_ids(self) -> list[str]:
        return [m.decode() async for m in self.r.sscan_iter(f"{self.p}:items", count=1000)]

    # embedding cache
    @_guard
    async def get_embedding(self, key: str) -> bytes | None:
        return await self.r.get(f"{self.p}:emb:{key}")

    @_guard
    async def put_embedding(self, key: str, vector: bytes, ttl_s: int) -> None:
        await self.r.set(f"{self.p}:emb:{key}", vector, ex=ttl_s)

    # users
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
            await self._delete_each([self._imp(rid) for rid in rids])
        # Logged events of the user still waiting in the stream are erased too,
        # and so are the user's records in the evaluation log.
        await self._ensure_group()
        doomed = [e async for e, f in self._scan_stream(self._stream)
                  if f.get(b"user_id", b"").decode() == user_id]
        logged = [e async for e, f in self._scan_stream(self._log)
                  if f.get(b"user_id", b"").decode() == user_id]
        pipe = self.r.pipeline(transaction=False)
        if doomed:
            pipe.xack(self._stream, GROUP, *doomed)
            pipe.xdel(self._stream, *doomed)
        if logged:
            pipe.xdel(self._log, *logged)
        await pipe.execute()

    async def _scan_stream(self, key: str, batch: int = 1000):
        start = "-"
        while True:
            chunk = await self.r.xrange(key, min=start, max="+", count=batch)
            if not chunk:
                return
            for entry_id, fields in chunk:
                yield entry_id, fields
            last = chunk[-1][0].decode()
            ms, seq = last.split("-")
            start = f"{ms}-{int(seq) + 1}"

    # impressions and feedback
    @_guard
    async def log_impression(self, imp: Impression, ttl_s: int, shown_max: int) -> None:
        await self.log_impressions([imp], ttl_s, shown_max)

    @_guard
    async def log_impressions(self, imps: list[Impression], ttl_s: int,
                              shown_max: int) -> None:
        """All of them in one pipeline (in order: a user's shown list keeps it)."""
        await self._ensure_group()
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for imp in imps:
            shown_key = self._user(imp.user_id, "shown")
            imps_key = self._user(imp.user_id, "impz")
            pipe.hset(self._imp(imp.request_id), mapping={
                "user_id": imp.user_id, "ts": repr(imp.ts), "version": imp.model_version,
                "state": imp.state, "items": orjson.dumps(imp.item_ids),
                "props": orjson.dumps(imp.propensities), "explored": orjson.dumps(imp.explored),
                "features": orjson.dumps(imp.features), "n_cand": imp.n_candidates,
                "agents": orjson.dumps(imp.agents), "sources": orjson.dumps(imp.sources),
                "depths": orjson.dumps(imp.depths), "arm_p": repr(imp.arm_propensity),
                **({"deferred": 1} if imp.deferred else {})})
            pipe.expire(self._imp(imp.request_id), ttl_s)
            if imp.item_ids:
                pipe.rpush(shown_key, *[f"{i}|{imp.ts!r}" for i in imp.item_ids])
                pipe.ltrim(shown_key, -shown_max, -1)
                pipe.expire(shown_key, self.user_ttl_s)
            # the user's impression ids, scored by when each expires (its TTL starts now,
            # not when it was served: one held through an outage is logged late), and
            # pruned as they do, so an erasure finds every impression still stored
            pipe.zadd(imps_key, {imp.request_id: now + ttl_s})
            pipe.zremrangebyscore(imps_key, "-inf", now)
            pipe.expire(imps_key, ttl_s)
            pipe.xadd(self._stream, {"type": "impression", "request_id": imp.request_id,
                                     "user_id": imp.user_id, "ts": repr(imp.ts)},
                      maxlen=self.stream_max, approximate=True)
        await pipe.execute()

    @_guard
    async def get_impressions(self, request_ids: list[str]) -> dict[str, Impression]:
        if not request_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hgetall(self._imp(rid))
        out = {}
        for rid, h in zip(request_ids, await pipe.execute(), strict=True):
            if h:
                out[rid] = Impression(rid, h[b"user_id"].decode(), float(h[b"ts"]),
                                      int(h[b"version"]), h[b"state"], orjson.loads(h[b"items"]),
                                      orjson.loads(h[b"props"]), orjson.loads(h[b"explored"]),
                                      orjson.loads(h.get(b"features", b"[]")),
                                      int(h.get(b"n_cand", 0)),
                                      _rewards_of(h), _events_of(h),
                                      # before arm_p, agents were top-k masks
                                      orjson.loads(h.get(b"agents", b"[]"))
                                      if b"arm_p" in h else [],
                                      orjson.loads(h.get(b"sources", b"[]")),
                                      orjson.loads(h.get(b"depths", b"[]")),
                                      float(h.get(b"arm_p", b"1")),
                                      h.get(b"deferred") == b"1",
                                      [k[2:].decode() for k in h if k.startswith(b"s:")])
        return out

    @_guard
    async def mark_seen(self, request_id: str, item_ids: list[str]) -> bool:
        fields = [x for i in dict.fromkeys(item_ids) for x in (f"s:{i}", 1)]
        return bool(await self._mark_seen(keys=[self._imp(request_id)], args=fields))

    @_guard
    async def feedback_on_slate(self, request_id: str, item_id: str, event: str,
                                value: float | None, reward: float, ts: float, ttl_s: int,
                                history_max: int) -> FeedbackOutcome:
        return (await self.feedback_on_slates(
            [FeedbackEvent(request_id, item_id, event, value, reward, ts)], ttl_s,
            history_max))[0]

    @_guard
    async def feedback_on_slates(self, events: list[FeedbackEvent], ttl_s: int,
                                 history_max: int) -> list[FeedbackOutcome]:
        """Two round trips for the whole list: the slates are read, and the dedupe
        markers claimed, in one pipeline; the writes of the accepted follow in another.
        No script spans both: the keys hash to different Cluster slots.

        Exactly once, whatever fails between the client and Redis: a marker is claimed
        as ``pending`` and becomes the reward only after the writes landed, and every
        write is idempotent (the impression holds one field per event, the history
        append skips an entry already there, a repeated stream entry is skipped by the
        learner). So a retry that finds its marker pending redoes the writes and is
        accepted, and a retry after the writes landed is a duplicate; a marker is
        released only for feedback that proved invalid, where nothing was written."""
        await self._ensure_group()
        markers = [self._marker(e.request_id, e.item_id, e.event) for e in events]
        pipe = self.r.pipeline(transaction=False)
        for e, marker in zip(events, markers, strict=True):
            # two fields, not HGETALL: the stored state is ~4.6 KB that feedback never reads
            pipe.hmget(self._imp(e.request_id), ["user_id", "items", "ts"])
            pipe.set(marker, PENDING, nx=True, ex=ttl_s)
            pipe.get(marker)
        replies = await pipe.execute()
        out: list[FeedbackOutcome] = []
        release: list[str] = []
        accepted: list[tuple[FeedbackEvent, str, str, float]] = []
        claimed: dict[str, float] = {}  # marker -> reward, for repeats within this list
        for n, (e, marker) in enumerate(zip(events, markers, strict=True)):
            (user_id, items, served), fresh, first = replies[3 * n: 3 * n + 3]
            if user_id is None or items is None or e.item_id not in orjson.loads(items):
                if fresh:
                    release.append(marker)
                out.append(FeedbackOutcome("unknown_request" if user_id is None or items is None
                                           else "not_in_slate"))
            elif marker in claimed:
                out.append(FeedbackOutcome("duplicate", claimed[marker]))
            elif not fresh and first is not None and first != PENDING:
                out.append(FeedbackOutcome("duplicate", float(first)))
            else:  # claimed now, or left pending by a delivery whose writes may not have landed
                claimed[marker] = e.reward
                accepted.append((e, user_id.decode(), marker, float(served or 0.0)))
                out.append(FeedbackOutcome("accepted", e.reward))
        if release:
            await self._delete_each(release)
        if accepted:
            await self._write_feedback(accepted, history_max, ttl_s)
        return out

    async def _delete_each(self, keys: list[str]) -> None:
        """One DEL per key, pipelined (keys of different Cluster slots)."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        await pipe.execute()

    def _marker(self, request_id: str, item_id: str, event: str) -> str:
        return f"{self.p}:fb:{request_id}:{item_id}:{event}"

    @_guard
    async def record_feedback(self, request_id: str, user_id: str, item_id: str, event: str,
                              value: float | None, reward: float, ts: float,
                              ttl_s: int, history_max: int) -> tuple[bool, float]:
        await self._ensure_group()
        marker = self._marker(request_id, item_id, event)
        if not await self.r.set(marker, PENDING, nx=True, ex=ttl_s):
            first = await self.r.get(marker)
            if first is not None and first != PENDING:
                return False, float(first)
        served = await self.r.hget(self._imp(request_id), "ts")
        await self._write_feedback(
            [(FeedbackEvent(request_id, item_id, event, value, reward, ts), user_id, marker,
              float(served or 0.0))], history_max, ttl_s)
        return True, reward

    async def _write_feedback(self, accepted: list[tuple[FeedbackEvent, str, str, float]],
                              history_max: int, ttl_s: int) -> None:
        """The writes of accepted feedback ``(event, user id, dedupe marker, the slate's
        time)``, each idempotent, then the markers' move from pending to the reward.
        If a write fails, the markers stay pending: the clients' retries (they got an
        error) redo the writes, which changes nothing that landed.

        On one Redis server the moves end the writes' pipeline: one connection's
        commands run in order, so a marker that moved follows writes that ran, and a
        reply that is lost after they all ran leaves the retry a ``duplicate``. A
        pipeline carries on past an error reply, though, so if a write was refused
        the markers are set back to pending. A Cluster pipeline sends each node its
        commands at once, so there the moves are a second round trip, sent only
        once every write succeeded."""
        cluster = isinstance(self.r, aioredis.RedisCluster)
        pipe = self.r.pipeline(transaction=False)
        for e, user_id, _, served in accepted:
            key = f"{e.request_id}:{e.item_id}:{e.event}"
            pipe.eval(_APPEND_ONCE, 2, self._user(user_id, "hist"),
                      self._user(user_id, "erased"),
                      orjson.dumps({"item_id": e.item_id, "event": e.event, "ts": e.ts,
                                    "value": e.value, "key": key}), key, history_max,
                      repr(served), self.user_ttl_s)
            pipe.xadd(self._stream, {"type": "feedback", "request_id": e.request_id,
                                     "user_id": user_id, "item_id": e.item_id,
                                     "event": e.event, "reward": repr(e.reward),
                                     "ts": repr(e.ts)}, maxlen=self.stream_max,
                      approximate=True)
            # one field per event, set (not added to): the same event twice is one reward;
            # only while the impression exists (HSET would create it, with no TTL)
            pipe.eval("if redis.call('EXISTS', KEYS[1]) == 1 then "
                      "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 0",
                      1, self._imp(e.request_id), f"e:{e.item_id}:{e.event}", repr(e.reward))
        if not cluster:
            for e, _, marker, _ in accepted:
                pipe.set(marker, repr(e.reward), ex=ttl_s)
        replies = await pipe.execute(raise_on_error=False)
        refused = [r for r in replies if isinstance(r, Exception)]
        if refused:
            if not cluster:  # the moves ran past the refused write: back to pending
                await self._set_each([(m, PENDING) for _, _, m, _ in accepted], ttl_s)
            raise refused[0]
        if cluster:
            await self._set_each([(m, repr(e.reward)) for e, _, m, _ in accepted], ttl_s)

    async def _set_each(self, pairs: list[tuple[str, bytes | str]], ttl_s: int) -> None:
        pipe = self.r.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(key, value, ex=ttl_s)
        await pipe.execute()

    # evaluation log
    @_guard
    async def append_log(self, records: list[dict], max_len: int) -> None:
        if not records:
            return
        pipe = self.r.pipeline(transaction=False)
        for rec in records:
            pipe.xadd(self._log, {"user_id": rec["user_id"], "json": orjson.dumps(rec)},
                      maxlen=max_len, approximate=False)
        await pipe.execute()

    @_guard
    async def read_log(self, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        entries = await self.r.xrevrange(self._log, count=limit)
        return [orjson.loads(f[b"json"]) for _, f in reversed(entries)]

    # stream
    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.r.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @_guard
    async def read_stream(self, consumer: str, count: int,
                          pending: bool = False) -> list[StreamEntry]:
        await self._ensure_group()
        group_read = functools.partial(self.r.xreadgroup, GROUP, consumer,
                                       {self._stream: "0" if pending else ">"}, count=count)
        try:
            resp = await group_read()
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis came back without its data (no persistence): recreate the group.
            self._group_ready = False
            await self._ensure_group()
            resp = await group_read()
        out: list[StreamEntry] = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                if fields:  # a deleted entry still pending reads back with no fields
                    out.append((entry_id.decode(),
                                {k.decode(): v.decode() for k, v in fields.items()}))
        return out

    @_guard
    async def ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(self._stream, GROUP, *entry_ids)
        pipe.xdel(self._stream, *entry_ids)
        await pipe.execute()

    @_guard
    async def claim_stream(self, consumer: str, min_idle_s: float, count: int,
                           ) -> list[StreamEntry]:
        await self._ensure_group()
        out: list[StreamEntry] = []
        start = "0-0"
        while len(out) < count:
            reply = await self.r.xautoclaim(self._stream, GROUP, consumer,
                                            int(min_idle_s * 1000), start_id=start,
                                            count=min(count - len(out), 1000))
            start, claimed = _text(reply[0]), reply[1]
            out.extend((e.decode(), {k.decode(): v.decode() for k, v in f.items()})
                       for e, f in claimed if f)
            if start == "0-0":
                break
        return out

    # learner lease
    @_guard
    async def hold_lease(self, owner: str, ttl_s: float) -> bool:
        return bool(await self._hold(keys=[self._model("lease")],
                                     args=[owner, max(int(ttl_s * 1000), 1)]))

    @_guard
    async def release_lease(self, owner: str) -> None:
        await self._release(keys=[self._model("lease")], args=[owner])

    @_guard
    async def lease_holder(self) -> str | None:
        holder = await self.r.get(self._model("lease"))
        return holder.decode() if holder is not None else None

    async def _run_commit(self, owner: str, acks: list[str], stats: dict[str, float],
                          log_records: list[dict], log_max: int,
                          weights: WeightsUpdate | None) -> bool:
        await self._ensure_group()
        version = weights.version if weights else 0
        keep = weights.keep if weights else 1
        keys = [self._model(k) for k in ("lease", "events", "stats", "log", "version",
                                         f"w:{version}", f"parent:{version}",
                                         f"w:{version - keep}", f"parent:{version - keep}",
                                         "erased")]
        args: list = [owner, GROUP, max(log_max, 1)]
        args += _counted(acks)
        args += [len(stats)] + [x for k, v in stats.items() for x in (k, repr(float(v)))]
        # a user erased after a record's slate was served: the script leaves it out
        args += [len(log_records)] + [x for rec in log_records for x in (
            rec["user_id"], repr(float(rec.get("ts", 0.0))), orjson.dumps(rec))]
        args += [1, weights.blob, version, weights.parent] if weights else [0]
        expected = weights.expected if weights else None
        args.append("" if expected is None else expected)
        done = int(await self._commit(keys=keys, args=args))
        if done == 2:
            raise VersionConflict(f"version {expected} is not the latest any more")
        return bool(done)

    @_guard
    async def commit_learning(self, owner: str, acks: list[str], stats: dict[str, float],
                              log_records: list[dict], log_max: int,
                              weights: WeightsUpdate | None = None) -> bool:
        return await self._run_commit(owner, acks, stats, log_records, log_max, weights)

    # model
    @_guard
    async def publish_weights(self, version: int, blob: bytes, stats: dict[str, float],
                              parent: int = 0, keep: int = 5, expected: int | None = None
                              ) -> None:
        await self._run_commit("", [], stats, [], 1,
                               WeightsUpdate(version, blob, parent, keep, expected))

    @_guard
    async def latest_version(self) -> int:
        v = await self.r.get(self._model("version"))
        return int(v) if v is not None else 0

    @_guard
    async def weights_parent(self, version: int) -> int:
        v = await self.r.get(self._model(f"parent:{version}"))
        return int(v) if v is not None else 0

    @_guard
    async def get_weights(self, version: int) -> bytes | None:
        return await self.r.get(self._model(f"w:{version}"))

    @_guard
    async def get_stats(self) -> dict[str, float]:
        raw = await self.r.hgetall(self._model("stats"))
        return {k.decode(): float(v) for k, v in raw.items()}

    # rate limiting
    @_guard
    async def count_request(self, bucket: str, window_start: int, window_s: int) -> int:
        key = f"{self.p}:rl:{bucket}:{window_start}"
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_s + 1)
        count, _ = await pipe.execute()
        return int(count)


__all__ = ["RedisStore"]
