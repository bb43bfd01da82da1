"""Entries that expire, and are freed when they do: the embedded store's TTLs.

Checking a TTL on read hides an expired entry but keeps its memory; a process that
serves for days must also free it. ``ExpiringMap`` keeps a heap ordered by expiry
beside the dict, so freeing what has expired costs a heap pop per entry, whenever
the store is written to, and never a scan of everything held.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    """A dict of values with expiry times (seconds on the store's clock).

    ``get`` answers None for an expired entry; ``purge`` removes every expired entry
    and calls ``on_expire(key, value)`` for each. Writing a key again moves its
    expiry; the heap's older record of it is skipped when it comes due."""

    def __init__(self, on_expire: Callable[[K, V], None] | None = None) -> None:
        self._values: dict[K, tuple[V, float]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = 0  # orders equal expiries; keys need not be comparable
        self._on_expire = on_expire

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def put(self, key: K, value: V, expires_at: float) -> None:
        self._values[key] = (value, expires_at)
        self._seq += 1
        heapq.heappush(self._heap, (expires_at, self._seq, key))
        if len(self._heap) > 4 * len(self._values) + 1024:
            self._compact()

    def get(self, key: K, now: float) -> V | None:
        hit = self._values.get(key)
        if hit is None or hit[1] < now:
            return None
        return hit[0]

    def pop(self, key: K) -> V | None:
        hit = self._values.pop(key, None)
        return None if hit is None else hit[0]

    def items(self, now: float) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, at) in self._values.items() if at >= now]

    def purge(self, now: float) -> int:
        """Remove every entry that expired before ``now``; returns how many."""
        removed = 0
        heap = self._heap
        while heap and heap[0][0] < now:
            at, _, key = heapq.heappop(heap)
            hit = self._values.get(key)
            if hit is not None and hit[1] == at:  # not written again since
                del self._values[key]
                removed += 1
                if self._on_expire is not None:
                    self._on_expire(key, hit[0])
        return removed

    def _compact(self) -> None:
        """Drop the heap's records of keys written again or removed (many rewrites of the
        same keys would otherwise grow the heap without bound)."""
        self._heap = [(at, seq, k) for at, seq, k in self._heap
                      if k in self._values and self._values[k][1] == at]
        heapq.heapify(self._heap)
