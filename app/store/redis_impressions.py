"""The Redis backend's impressions, the feedback on them (exactly once) and the
evaluation log."""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from app.store.base import FeedbackEvent, FeedbackOutcome, Impression, ImpressionLog
from app.store.redis_core import (
    PENDING,
    LuaScript,
    RedisCore,
    RedisRole,
    _guard,
    raise_first_refused,
)

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

# Every write of one accepted feedback event on one Redis server, in the order of the
# pipelined commands a Redis Cluster runs instead (``_write_feedback_on_cluster``): the history
# append of _APPEND_ONCE, the stream entry, the impression's reward field (only while
# the impression exists), and last the marker's move from pending to the reward. A
# command refused on the way (WRONGTYPE, out of memory) stops the script before the
# move, so the marker stays pending and the client's retry redoes the writes.
# KEYS: history, erasure tombstone, impression, stream, dedupe marker.
# ARGV: history entry (JSON), its event key, history max length, the slate's time,
# history TTL, the impression's field, the reward, stream max length, marker TTL,
# then the stream entry's field/value pairs.
_RECORD_ONCE = LuaScript("""
local erased = redis.call('GET', KEYS[2])
if not (erased and tonumber(erased) >= tonumber(ARGV[4])) then
  local key = '"key":' .. cjson.encode(ARGV[2])
  local seen = false
  for _, entry in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[3]), -1)) do
    if string.find(entry, key, 1, true) then seen = true break end
  end
  if not seen then
    redis.call('RPUSH', KEYS[1], ARGV[1])
    redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
    redis.call('EXPIRE', KEYS[1], ARGV[5])
  end
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', unpack(ARGV, 10))
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], ARGV[6], ARGV[7]) end
redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[9])
return 1
""")

# Every write of one impression on one Redis server (a Redis Cluster keeps them on
# different nodes, and pipelines the same commands instead:
# ``_log_impressions_on_cluster``): its id in the user's impression index first (scored
# by when it expires, pruned as they do), so that an erasure finds whatever of it a
# refused later write left stored; its hash and TTL, the items appended to the user's
# shown list, its stream entry.
# KEYS: impression, the user's shown list, the user's impression index, stream.
# ARGV: impression TTL, shown list max length, user TTL, now, when it expires, request
# id, user id, served at, stream max length, the number H of hash arguments, then H
# hash field/value arguments, then the shown list's entries.
_LOG_ONCE = LuaScript("""
local h = tonumber(ARGV[10])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 11, 10 + h))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if #ARGV > 10 + h then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 11 + h, #ARGV))
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'type', 'impression',
           'request_id', ARGV[6], 'user_id', ARGV[7], 'ts', ARGV[8])
return 1
""")

# Set fields of a stored impression (displayed items, s:{item} 1; on a Redis Cluster
# also rewards, e:{item}:{event} reward); never re-creates one that expired (it would
# have no TTL). KEYS: the impression; ARGV: field, value, field, value...
_MARK_SEEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


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


def _impression_of(request_id: str, h: dict[bytes, bytes]) -> Impression:
    """An impression from its stored hash, written by this release or an earlier one."""
    return Impression(request_id, h[b"user_id"].decode(), float(h[b"ts"]),
                      int(h[b"version"]), h[b"state"], orjson.loads(h[b"items"]),
                      orjson.loads(h[b"props"]), orjson.loads(h[b"explored"]),
                      orjson.loads(h.get(b"features", b"[]")), int(h.get(b"n_cand", 0)),
                      _rewards_of(h), _events_of(h),
                      # before arm_p, agents were top-k masks
                      orjson.loads(h.get(b"agents", b"[]")) if b"arm_p" in h else [],
                      orjson.loads(h.get(b"sources", b"[]")),
                      orjson.loads(h.get(b"depths", b"[]")),
                      float(h.get(b"arm_p", b"1")), h.get(b"deferred") == b"1",
                      [k[2:].decode() for k in h if k.startswith(b"s:")])


class RedisImpressions(RedisRole, ImpressionLog):
    def __init__(self, core: RedisCore) -> None:
        super().__init__(core)
        self._mark_seen = self.r.register_script(_MARK_SEEN)

    @_guard
    async def log_impression(self, imp: Impression, ttl_s: int, shown_max: int) -> None:
        await self.log_impressions([imp], ttl_s, shown_max)

    @_guard
    async def log_impressions(self, imps: list[Impression], ttl_s: int,
                              shown_max: int) -> None:
        """All of them in one pipeline (in order: a user's shown list keeps it); on one
        Redis server, one script call each (``_LOG_ONCE``)."""
        await self.core.ensure_group()
        now = time.time()
        if isinstance(self.r, aioredis.RedisCluster):
            await self._log_impressions_on_cluster(imps, ttl_s, shown_max, now)
            return
        calls = []
        for imp in imps:
            fields = [x for kv in self._impression_fields(imp).items() for x in kv]
            calls.append((
                [self._imp(imp.request_id), self._user(imp.user_id, "shown"),
                 self._user(imp.user_id, "impz"), self._stream],
                [ttl_s, shown_max, self.user_ttl_s, repr(now), repr(now + ttl_s),
                 imp.request_id, imp.user_id, repr(imp.ts), self.stream_max, len(fields),
                 *fields, *self._shown_entries(imp)]))
        await self.core.run_script_each(_LOG_ONCE, calls)

    async def _log_impressions_on_cluster(self, imps: list[Impression], ttl_s: int,
                                          shown_max: int, now: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        for imp in imps:
            shown_key = self._user(imp.user_id, "shown")
            imps_key = self._user(imp.user_id, "impz")
            pipe.hset(self._imp(imp.request_id), mapping=self._impression_fields(imp))
            pipe.expire(self._imp(imp.request_id), ttl_s)
            if imp.item_ids:
                pipe.rpush(shown_key, *self._shown_entries(imp))
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

    @staticmethod
    def _impression_fields(imp: Impression) -> dict[str, bytes | str | int]:
        return {"user_id": imp.user_id, "ts": repr(imp.ts), "version": imp.model_version,
                "state": imp.state, "items": orjson.dumps(imp.item_ids),
                "props": orjson.dumps(imp.propensities), "explored": orjson.dumps(imp.explored),
                "features": orjson.dumps(imp.features), "n_cand": imp.n_candidates,
                "agents": orjson.dumps(imp.agents), "sources": orjson.dumps(imp.sources),
                "depths": orjson.dumps(imp.depths), "arm_p": repr(imp.arm_propensity),
                **({"deferred": 1} if imp.deferred else {})}

    @staticmethod
    def _shown_entries(imp: Impression) -> list[str]:
        return [f"{i}|{imp.ts!r}" for i in imp.item_ids]

    @_guard
    async def get_impressions(self, request_ids: list[str]) -> dict[str, Impression]:
        found = await self.core.hashes({rid: self._imp(rid) for rid in request_ids})
        return {rid: _impression_of(rid, h) for rid, h in found.items()}

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
        await self.core.ensure_group()
        markers = [self._marker(e.request_id, e.item_id, e.event) for e in events]
        pipe = self.r.pipeline(transaction=False)
        for e, marker in zip(events, markers, strict=True):
            # two fields, not HGETALL: the stored state is ~4.6 KB that feedback never reads
            pipe.hmget(self._imp(e.request_id), ["user_id", "items", "ts"])
            # claims the marker and answers what it held before (Redis 7.0: NX with GET)
            pipe.set(marker, PENDING, nx=True, ex=ttl_s, get=True)
        replies = await pipe.execute()
        out: list[FeedbackOutcome] = []
        release: list[str] = []
        accepted: list[tuple[FeedbackEvent, str, str, float]] = []
        claimed: dict[str, float] = {}  # marker -> reward, for repeats within this list
        for n, (e, marker) in enumerate(zip(events, markers, strict=True)):
            (user_id, items, served), before = replies[2 * n: 2 * n + 2]
            fresh = before is None  # the marker was claimed now
            if user_id is None or items is None or e.item_id not in orjson.loads(items):
                if fresh:
                    release.append(marker)
                out.append(FeedbackOutcome("unknown_request" if user_id is None or items is None
                                           else "not_in_slate"))
            elif marker in claimed:
                out.append(FeedbackOutcome("duplicate", claimed[marker]))
            elif before is not None and before != PENDING:
                out.append(FeedbackOutcome("duplicate", float(before)))
            else:  # claimed now, or left pending by a delivery whose writes may not have landed
                claimed[marker] = e.reward
                accepted.append((e, user_id.decode(), marker, float(served or 0.0)))
                out.append(FeedbackOutcome("accepted", e.reward))
        if release:
            await self.core.delete_each(release)
        if accepted:
            await self._write_feedback(accepted, history_max, ttl_s)
        return out

    def _marker(self, request_id: str, item_id: str, event: str) -> str:
        return f"{self.p}:fb:{request_id}:{item_id}:{event}"

    @_guard
    async def record_feedback(self, request_id: str, user_id: str, item_id: str, event: str,
                              value: float | None, reward: float, ts: float,
                              ttl_s: int, history_max: int) -> tuple[bool, float]:
        await self.core.ensure_group()
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

        On one Redis server each event's writes and its move are one script
        (``_RECORD_ONCE``), all events' scripts in one pipeline: the move is the
        script's last command, so it follows writes that ran, and a reply that is lost
        after the script ran leaves the retry a ``duplicate``. A Redis Cluster keeps
        these keys on different nodes, so there the writes are pipelined commands and
        the moves a second round trip, sent only once every write succeeded."""
        if isinstance(self.r, aioredis.RedisCluster):
            await self._write_feedback_on_cluster(accepted, history_max, ttl_s)
            return
        await self.core.run_script_each(_RECORD_ONCE, [
            ([self._user(user_id, "hist"), self._user(user_id, "erased"),
              self._imp(e.request_id), self._stream, marker],
             [self._history_entry(e, key), key, history_max, repr(served), self.user_ttl_s,
              f"e:{e.item_id}:{e.event}", repr(e.reward), self.stream_max, ttl_s,
              *self._stream_fields(e, user_id)])
            for e, user_id, marker, served in accepted
            for key in [f"{e.request_id}:{e.item_id}:{e.event}"]])

    async def _write_feedback_on_cluster(
            self, accepted: list[tuple[FeedbackEvent, str, str, float]], history_max: int,
            ttl_s: int) -> None:
        pipe = self.r.pipeline(transaction=False)
        for e, user_id, _, served in accepted:
            key = f"{e.request_id}:{e.item_id}:{e.event}"
            pipe.eval(_APPEND_ONCE, 2, self._user(user_id, "hist"),
                      self._user(user_id, "erased"), self._history_entry(e, key), key,
                      history_max, repr(served), self.user_ttl_s)
            fields = self._stream_fields(e, user_id)
            pipe.xadd(self._stream, dict(zip(fields[::2], fields[1::2], strict=True)),
                      maxlen=self.stream_max, approximate=True)
            # one field per event, set (not added to): the same event twice is one reward;
            # only while the impression exists (HSET would create it, with no TTL)
            pipe.eval(_MARK_SEEN, 1, self._imp(e.request_id), f"e:{e.item_id}:{e.event}",
                      repr(e.reward))
        raise_first_refused(await pipe.execute(raise_on_error=False))
        await self.core.set_each([(m, repr(e.reward)) for e, _, m, _ in accepted], ttl_s)

    @staticmethod
    def _history_entry(e: FeedbackEvent, key: str) -> bytes:
        return orjson.dumps({"item_id": e.item_id, "event": e.event, "ts": e.ts,
                             "value": e.value, "key": key})

    @staticmethod
    def _stream_fields(e: FeedbackEvent, user_id: str) -> list[str]:
        """The feedback's stream entry, as field, value, field, value..."""
        return ["type", "feedback", "request_id", e.request_id, "user_id", user_id,
                "item_id", e.item_id, "event", e.event, "reward", repr(e.reward),
                "ts", repr(e.ts)]

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

