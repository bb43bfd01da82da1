"""The Redis backend's connection, key names and the helpers its roles share.

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
import hashlib
import re
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as rexc

from app.store.base import StoreUnavailable

GROUP = "learners"
# erasure tombstones are kept this long: longer than any feedback write or learner
# commit can take to land after the erasure it races
ERASED_KEPT_S = 86_400
# a feedback dedupe marker whose writes have not all landed yet (see
# ``RedisImpressions.feedback_on_slates``)
PENDING = b"pending"

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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _guard(fn):
    """Turn connection-level failures into StoreUnavailable (the API answers 503), and
    bound the whole call, every round trip in it, by the store's ``timeout_s``.

    One deadline per call instead of redis-py's socket timeout, which arms a timer for
    every reply it reads, one per command of a pipeline (about 6% of the event loop's
    GIL time under feedback load). A call cut off by its deadline disconnects the
    connection it was reading from (redis-py's handling of a cancelled read), so the
    next call never reads a stale reply. Wraps the methods of ``RedisCore`` and of the
    roles (``RedisRole``), both of which name the connection as ``core``."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        core = self.core
        try:
            async with asyncio.timeout(core.timeout_s):
                return await fn(self, *args, **kwargs)
        except _DOWN as exc:  # TimeoutError, the deadline's, is an OSError
            if isinstance(exc, rexc.ReadOnlyError):
                # a failover made this server a replica: reconnect, so the address
                # (a DNS name, a service) can lead to the new primary
                await core.reconnect()
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


def raise_first_refused(replies: list[Any]) -> None:
    """Raise the first error among a pipeline's replies (``execute(raise_on_error=
    False)``), once every command in it ran."""
    refused = [r for r in replies if isinstance(r, Exception)]
    if refused:
        raise refused[0]


class LuaScript:
    """A Lua script run by its SHA1 (EVALSHA): its text crosses the wire once per
    Redis server (``RedisCore.run_script_each``), not with every call as EVAL sends it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class RedisKeys:
    """The key names of the layout above, under the prefix ``p``."""

    p: str

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


class RedisCore(RedisKeys):
    """One client (a pool of connections, or a Cluster client) and what every role
    shares on it: the deadline, the consumer group, reconnecting after a failover."""

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
        self.group_ready = False
        self.scripts_loaded: set[str] = set()  # SHA1s this client loaded

    @property
    def core(self) -> RedisCore:
        """The connection a guarded call runs on (``_guard``): this one."""
        return self

    async def close(self) -> None:
        if isinstance(self.r, aioredis.RedisCluster):
            await self.r.aclose()
        else:
            await self.r.aclose(close_connection_pool=True)

    @_guard
    async def ping(self) -> bool:
        return bool(await self.r.ping())

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

    async def ensure_group(self) -> None:
        """Create the learners' consumer group (and the stream) once per client, and again
        after Redis lost it (``RedisStream.read_stream`` sees NOGROUP)."""
        if self.group_ready:
            return
        try:
            await self.r.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.group_ready = True

    async def run_script_each(self, script: LuaScript,
                              calls: list[tuple[list[str], list[Any]]]) -> None:
        """``script`` once per ``(keys, args)``, in one pipeline, by its SHA1; raises the
        first error any call answered, once every call ran. A server that lost its
        scripts (restarted, SCRIPT FLUSH) answers NOSCRIPT to the calls that reached
        it after the loss, which did not run: the script is loaded again and those
        calls, and only those, are sent once more."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            if not todo:
                break
            if script.sha not in self.scripts_loaded:
                await self.r.script_load(script.text)
                self.scripts_loaded.add(script.sha)
            pipe = self.r.pipeline(transaction=False)
            for n in todo:
                keys, args = calls[n]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            for n, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
                replies[n] = reply
            lost = [n for n in todo if isinstance(replies[n], rexc.NoScriptError)]
            if lost and attempt == 0:
                self.scripts_loaded.discard(script.sha)
            todo = lost
        raise_first_refused(replies)

    async def delete_each(self, keys: list[str]) -> None:
        """One DEL per key, pipelined (keys of different Cluster slots)."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        await pipe.execute()

    async def hashes(self, keys: dict[str, str]) -> dict[str, dict[bytes, bytes]]:
        """``{name: key}`` -> ``{name: the hash at key}`` for the keys that exist, one
        HGETALL each, pipelined."""
        if not keys:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for key in keys.values():
            pipe.hgetall(key)
        return {name: h for name, h in zip(keys, await pipe.execute(), strict=True) if h}

    async def set_each(self, pairs: list[tuple[str, bytes | str]], ttl_s: int) -> None:
        """One SET with a TTL per pair, pipelined."""
        pipe = self.r.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(key, value, ex=ttl_s)
        await pipe.execute()

    async def scan_stream(self, key: str, batch: int = 1000):
        """Every entry of a stream, oldest first, ``batch`` per round trip."""
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


class RedisRole(RedisKeys):
    """A role of the store (``app.store.base``) on a shared ``RedisCore``."""

    def __init__(self, core: RedisCore) -> None:
        self.core = core
        self.p = core.p

    @property
    def r(self) -> Any:
        return self.core.r

    @property
    def user_ttl_s(self) -> int:
        return self.core.user_ttl_s

    @property
    def stream_max(self) -> int:
        return self.core.stream_max
