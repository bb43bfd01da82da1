"""The embedded backend: in-process dictionaries for the single-process mode.

Nothing survives a restart, by design: this is the development default. Every key
has a bound, as in Redis: impressions, feedback markers and cached embeddings expire
with their TTLs, and a user's history, shown items and impression list expire
``user_ttl_s`` after their last write. Expired entries read as absent at once and are
freed at the next write (``ExpiringMap``), so memory stays flat under a steady load.
Every method runs without awaiting, so each is atomic on the event loop
(``commit_learning`` included).
"""

from __future__ import annotations

import itertools
from collections import deque

from app.clock import SYSTEM_CLOCK, Clock
from app.store.base import (
    CatalogChange,
    CatalogStore,
    EmbeddingCache,
    EventStream,
    Impression,
    ImpressionLog,
    ItemRecord,
    ModelRegistry,
    RateLimits,
    Store,
    StreamEntry,
    UserData,
    UserStore,
    VersionConflict,
    WeightsUpdate,
    change_id_key,
)
from app.store.expiry import ExpiringMap

CATALOG_CHANGES_KEPT = 10_000
USER_TTL_S = 30 * 86_400
ERASED_KEPT_S = 86_400  # as the Redis backend's tombstones


class MemoryStore(Store):
    """Every role on one set of in-process dictionaries. The roles' classes below read
    and write this object's state: several of their operations span roles (feedback
    appends to a history and the stream, erasure reaches the stream and the log)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, user_ttl_s: float = USER_TTL_S) -> None:
        self.clock = clock
        self.user_ttl_s = user_ttl_s
        self._items: dict[str, ItemRecord] = {}
        self._emb: ExpiringMap[str, bytes] = ExpiringMap()
        self._history: dict[str, list[dict]] = {}
        self._shown: dict[str, list[tuple[str, float]]] = {}
        self._user_imps: dict[str, set[str]] = {}
        # a user's history, shown items and impression list live until this expires
        self._users: ExpiringMap[str, None] = ExpiringMap(lambda user, _: self._forget(user))
        self._imps: ExpiringMap[str, Impression] = ExpiringMap(self._imp_expired)
        self._dedupe: ExpiringMap[str, float] = ExpiringMap()
        # user -> when erased: their closed impressions still in a learner's backlog are
        # left out of the evaluation log
        self._erased: ExpiringMap[str, float] = ExpiringMap()
        # The stream holds only unacknowledged work: acked entries are dropped.
        self._entries: dict[str, dict[str, str]] = {}
        self._undelivered: deque[str] = deque()
        self._pending: dict[str, str] = {}  # entry id -> consumer it was delivered to
        self._delivered_at: dict[str, float] = {}  # entry id -> when (monotonic clock)
        self._seq = itertools.count(1)
        self._weights: dict[int, bytes] = {}
        self._parents: dict[int, int] = {}
        self._window_start = 0
        self._counts: dict[str, int] = {}
        self._version = 0
        self._stats: dict[str, float] = {}
        self._log: deque[dict] = deque()
        self._lease: tuple[str, float] | None = None  # (owner, expiry on the monotonic clock)
        self._changes: deque[CatalogChange] = deque()
        self._changes_trimmed = "0"  # the newest change id dropped from ``_changes``
        self.catalog = MemoryCatalog(self)
        self.embeddings = MemoryEmbeddings(self)
        self.users = MemoryUsers(self)
        self.impressions = MemoryImpressions(self)
        self.stream = MemoryStream(self)
        self.registry = MemoryRegistry(self)
        self.limits = MemoryRateLimits(self)

    async def ping(self) -> bool:
        return True

    def _purge(self) -> None:
        """Free what has expired (a heap pop per expired entry: run on every write)."""
        now = self.clock.time()
        for expiring in (self._imps, self._dedupe, self._emb, self._users, self._erased):
            expiring.purge(now)

    def _imp_expired(self, request_id: str, imp: Impression) -> None:
        ids = self._user_imps.get(imp.user_id)
        if ids is not None:
            ids.discard(request_id)
            if not ids:
                del self._user_imps[imp.user_id]

    def _touch_user(self, user_id: str) -> None:
        self._users.put(user_id, None, self.clock.time() + self.user_ttl_s)

    def _forget(self, user_id: str) -> None:
        self._history.pop(user_id, None)
        self._shown.pop(user_id, None)
        for rid in self._user_imps.pop(user_id, set()):
            self._imps.pop(rid)

    def held(self) -> dict[str, int]:
        """How many entries of each kind are held (expired ones included until freed)."""
        return {"impressions": len(self._imps), "feedback_markers": len(self._dedupe),
                "embeddings": len(self._emb), "users": len(self._users),
                "stream": len(self._entries), "log": len(self._log)}

    def _new_id(self) -> str:
        return f"{int(self.clock.time() * 1000)}-{next(self._seq)}"

    def _announce(self, origin: str, item_ids: list[str]) -> None:
        self._changes.append((self._new_id(), origin, list(item_ids)))
        while len(self._changes) > CATALOG_CHANGES_KEPT:
            self._changes_trimmed = self._changes.popleft()[0]

    def _append(self, fields: dict[str, str]) -> None:
        entry_id = self._new_id()
        self._entries[entry_id] = fields
        self._undelivered.append(entry_id)


class _MemoryRole:
    def __init__(self, store: MemoryStore) -> None:
        self.m = store


class MemoryCatalog(_MemoryRole, CatalogStore):
    async def put_items(self, items: list[ItemRecord], origin: str = "") -> int:
        for item in items:
            self.m._items[item.item_id] = item
        self.m._announce(origin, [it.item_id for it in items])
        return len(self.m._items)

    async def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]:
        return {i: self.m._items[i] for i in item_ids if i in self.m._items}

    async def delete_item(self, item_id: str, origin: str = "") -> bool:
        self.m._announce(origin, [item_id])
        return self.m._items.pop(item_id, None) is not None

    async def last_catalog_change(self) -> str:
        return self.m._changes[-1][0] if self.m._changes else self.m._changes_trimmed

    async def catalog_changes(self, after: str, count: int = 1000,
                              ) -> tuple[list[CatalogChange], bool]:
        complete = change_id_key(after) >= change_id_key(self.m._changes_trimmed)
        newer = [c for c in self.m._changes if change_id_key(c[0]) > change_id_key(after)]
        return newer[:count], complete

    async def catalog_size(self) -> int:
        return len(self.m._items)

    async def all_item_ids(self) -> list[str]:
        return list(self.m._items)


class MemoryEmbeddings(_MemoryRole, EmbeddingCache):
    async def get_embedding(self, key: str) -> bytes | None:
        return self.m._emb.get(key, self.m.clock.time())

    async def put_embedding(self, key: str, vector: bytes, ttl_s: int) -> None:
        self.m._purge()
        self.m._emb.put(key, vector, self.m.clock.time() + ttl_s)


class MemoryUsers(_MemoryRole, UserStore):
    async def get_user(self, user_id: str) -> UserData:
        self.m._purge()  # a user whose data expired reads as new
        return UserData(list(self.m._history.get(user_id, [])),
                        list(self.m._shown.get(user_id, [])))

    async def add_event(self, user_id: str, entry: dict, max_len: int) -> None:
        self.m._purge()
        self.m._touch_user(user_id)
        hist = self.m._history.setdefault(user_id, [])
        hist.append(dict(entry))
        del hist[:-max_len]

    async def delete_user(self, user_id: str) -> None:
        now = self.m.clock.time()
        self.m._erased.put(user_id, now, now + ERASED_KEPT_S)
        self.m._users.pop(user_id)
        self.m._forget(user_id)
        doomed = {e for e, f in self.m._entries.items() if f.get("user_id") == user_id}
        for entry_id in doomed:
            del self.m._entries[entry_id]
            self.m._pending.pop(entry_id, None)
            self.m._delivered_at.pop(entry_id, None)
        self.m._undelivered = deque(e for e in self.m._undelivered if e not in doomed)
        self.m._log = deque(r for r in self.m._log if r.get("user_id") != user_id)


class MemoryImpressions(_MemoryRole, ImpressionLog):
    async def log_impression(self, imp: Impression, ttl_s: int, shown_max: int) -> None:
        self.m._purge()
        self.m._touch_user(imp.user_id)
        self.m._imps.put(imp.request_id, imp, self.m.clock.time() + ttl_s)
        self.m._user_imps.setdefault(imp.user_id, set()).add(imp.request_id)
        shown = self.m._shown.setdefault(imp.user_id, [])
        shown.extend((i, imp.ts) for i in imp.item_ids)
        del shown[:-shown_max]
        self.m._append({"type": "impression", "request_id": imp.request_id,
                        "user_id": imp.user_id, "ts": repr(imp.ts)})

    async def get_impressions(self, request_ids: list[str]) -> dict[str, Impression]:
        now = self.m.clock.time()
        out = {}
        for rid in request_ids:
            hit = self.m._imps.get(rid, now)
            if hit is not None:
                out[rid] = hit
        return out

    async def mark_seen(self, request_id: str, item_ids: list[str]) -> bool:
        imp = self.m._imps.get(request_id, self.m.clock.time())
        if imp is None:
            return False
        imp.seen = list(dict.fromkeys([*imp.seen, *item_ids]))
        return True

    async def record_feedback(self, request_id: str, user_id: str, item_id: str, event: str,
                              value: float | None, reward: float, ts: float,
                              ttl_s: int, history_max: int) -> tuple[bool, float]:
        key = f"{request_id}\x00{item_id}\x00{event}"
        seen = self.m._dedupe.get(key, self.m.clock.time())
        if seen is not None:
            return False, seen
        self.m._dedupe.put(key, reward, self.m.clock.time() + ttl_s)
        imp = self.m._imps.get(request_id, self.m.clock.time())
        if imp is not None:
            imp.rewards[item_id] = imp.rewards.get(item_id, 0.0) + reward
            imp.events.setdefault(item_id, []).append(event)
        await self.m.users.add_event(user_id, {"item_id": item_id, "event": event, "ts": ts,
                                               "value": value}, history_max)
        self.m._append({"type": "feedback", "request_id": request_id, "user_id": user_id,
                        "item_id": item_id, "event": event, "reward": repr(reward),
                        "ts": repr(ts)})
        return True, reward

    # evaluation log
    async def append_log(self, records: list[dict], max_len: int) -> None:
        now = self.m.clock.time()
        for r in records:
            erased = self.m._erased.get(r.get("user_id", ""), now)
            if erased is None or erased < r.get("ts", 0.0):
                self.m._log.append(dict(r))
        while len(self.m._log) > max_len:
            self.m._log.popleft()

    async def read_log(self, limit: int) -> list[dict]:
        return [dict(r) for r in list(self.m._log)[-limit:]] if limit > 0 else []


class MemoryStream(_MemoryRole, EventStream):
    async def stream_length(self) -> int:
        return len(self.m._entries)

    async def read_stream(self, consumer: str, count: int,
                          pending: bool = False) -> list[StreamEntry]:
        if pending:
            ids = [e for e, c in self.m._pending.items() if c == consumer][:count]
            return [(e, self.m._entries[e]) for e in ids]
        out: list[tuple[str, dict]] = []
        while self.m._undelivered and len(out) < count:
            entry_id = self.m._undelivered.popleft()
            self.m._pending[entry_id] = consumer
            self.m._delivered_at[entry_id] = self.m.clock.monotonic()
            out.append((entry_id, self.m._entries[entry_id]))
        return out

    async def ack(self, entry_ids: list[str]) -> None:
        for e in entry_ids:
            if self.m._pending.pop(e, None) is not None:
                self.m._entries.pop(e, None)
                self.m._delivered_at.pop(e, None)

    async def claim_stream(self, consumer: str, min_idle_s: float, count: int,
                           ) -> list[StreamEntry]:
        now = self.m.clock.monotonic()
        ids = [e for e in self.m._pending if now - self.m._delivered_at[e] >= min_idle_s][:count]
        for e in ids:
            self.m._pending[e] = consumer
            self.m._delivered_at[e] = now
        return [(e, self.m._entries[e]) for e in ids]


class MemoryRegistry(_MemoryRole, ModelRegistry):
    async def hold_lease(self, owner: str, ttl_s: float) -> bool:
        now = self.m.clock.monotonic()
        if self.m._lease is None or self.m._lease[0] == owner or self.m._lease[1] <= now:
            self.m._lease = (owner, now + ttl_s)
            return True
        return False

    async def release_lease(self, owner: str) -> None:
        if self.m._lease is not None and self.m._lease[0] == owner:
            self.m._lease = None

    async def lease_holder(self) -> str | None:
        if self.m._lease is None or self.m._lease[1] <= self.m.clock.monotonic():
            return None
        return self.m._lease[0]

    async def commit_learning(self, owner: str, acks: list[str], stats: dict[str, float],
                              log_records: list[dict], log_max: int,
                              weights: WeightsUpdate | None = None) -> bool:
        if await self.lease_holder() != owner:
            return False
        if weights is not None:
            await self.publish_weights(weights.version, weights.blob, {}, weights.parent,
                                       weights.keep, weights.expected)
        self.m._stats.update(stats)
        await self.m.impressions.append_log(log_records, log_max)
        await self.m.stream.ack(acks)
        return True

    # model
    async def publish_weights(self, version: int, blob: bytes, stats: dict[str, float],
                              parent: int = 0, keep: int = 5, expected: int | None = None
                              ) -> None:
        if expected is not None and self.m._version != expected:
            raise VersionConflict(f"version {expected} is not the latest any more")
        self.m._weights[version] = blob
        self.m._parents[version] = parent
        for old in [v for v in self.m._weights if v <= version - keep]:
            del self.m._weights[old]
            self.m._parents.pop(old, None)
        self.m._version = max(self.m._version, version)
        self.m._stats.update(stats)

    async def weights_parent(self, version: int) -> int:
        return self.m._parents.get(version, 0)

    async def latest_version(self) -> int:
        return self.m._version

    async def get_weights(self, version: int) -> bytes | None:
        return self.m._weights.get(version)

    async def get_stats(self) -> dict[str, float]:
        return dict(self.m._stats)


class MemoryRateLimits(_MemoryRole, RateLimits):
    async def count_request(self, bucket: str, window_start: int, window_s: int) -> int:
        if window_start != self.m._window_start:  # a new window: older counts are done with
            self.m._window_start, self.m._counts = window_start, {}
        self.m._counts[bucket] = self.m._counts.get(bucket, 0) + 1
        return self.m._counts[bucket]
