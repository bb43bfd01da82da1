"""The Redis backend's event stream (consumer group) and model registry (lease,
weights versions, the learner's atomic commit)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import orjson
from redis import exceptions as rexc

from app.store.base import EventStream, ModelRegistry, StreamEntry, VersionConflict, WeightsUpdate
from app.store.redis_core import GROUP, RedisCore, RedisRole, _guard, _text

_HOLD_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
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


def _counted(values: Iterable) -> list:
    values = list(values)
    return [len(values), *values]


class RedisStream(RedisRole, EventStream):
    @_guard
    async def stream_length(self) -> int:
        """Entries in the event stream: acknowledged ones are deleted, so this is the
        work no learner has committed yet."""
        return int(await self.r.xlen(self._stream))

    @_guard
    async def read_stream(self, consumer: str, count: int,
                          pending: bool = False) -> list[StreamEntry]:
        await self.core.ensure_group()
        group_read = functools.partial(self.r.xreadgroup, GROUP, consumer,
                                       {self._stream: "0" if pending else ">"}, count=count)
        try:
            resp = await group_read()
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis came back without its data (no persistence): recreate the group.
            self.core.group_ready = False
            await self.core.ensure_group()
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
        await self.core.ensure_group()
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


class RedisRegistry(RedisRole, ModelRegistry):
    def __init__(self, core: RedisCore) -> None:
        super().__init__(core)
        self._hold = self.r.register_script(_HOLD_LEASE)
        self._release = self.r.register_script(_RELEASE_LEASE)
        self._commit = self.r.register_script(_COMMIT)

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
        await self.core.ensure_group()
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
