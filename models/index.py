"""Candidate retrieval: a FAISS inner-product index keyed by string item ids.

Rows are append-only: an update appends a new row and retires the old one, a
delete retires its row, and retired rows are filtered out of every search and
compacted away once they make up a fifth of the index. This gives add, update
and remove on every FAISS index type, HNSW included (which cannot remove).

The FAISS structure (exact below a catalog size, IVF or HNSW above it; exact on
CUDA) is ``models.ann``'s; this class owns the rows and their data, and re-ranks
every search's result by the exact float32 inner products, so quantisation only
decides which rows reach the cut, never their order. Neither faiss GPU resources nor
this class are thread-safe, so every search and mutation holds one lock; callers
batch concurrent queries into one ``search`` call.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import compress, repeat

import numpy as np

from models.ann import AnnParams, AnnStructure
from models.lru import LRUCache
from models.state import (
    N_STATS,
    PRIOR_CTR,
    PRIOR_WEIGHT,
    TAG_BUCKETS,
    smoothed_ctr,
    tag_vectors,
)

COMPACT_FRACTION = 0.2
# rows moved per step when compacting in place: bounds the temporary copy (~30 MB at 384-d)
COMPACT_CHUNK = 20_000
# the engagement ranking (``CandidateIndex.engaging``) is recomputed once this many more
# impressions were counted: one pass over the counts (18 ms at 1M items on this 2-core
# machine) per about a second of traffic at 100 slates/s, not one per request; counted
# in impressions, not seconds, so a simulation on its own clock ranks alike every run
ENGAGING_REFRESH_IMPRESSIONS = 1000
# ``CandidateIndex.related``: an item's neighbour list is kept this many rows deeper
# than asked (what a request excludes is skipped without a new search) ...
NEIGHBOUR_MARGIN = 512
# ... for this many items (int32 rows: about 2.2 KB each, 45 MB in all)
NEIGHBOURS_KEPT = 20_000


# one query's result by row: the rows, best first, and their embeddings (a copy)
Hits = tuple[np.ndarray, np.ndarray]
# no rows: what a query that bans nothing passes
NO_ROWS = np.zeros(0, dtype=np.int64)


class CandidateIndex:
    """Maps item ids to embeddings and answers top-N inner-product queries.

    ``vectors_of(ids)`` gives the stored embeddings for ids (the Q-network scores
    those), and ``search`` returns, per query, up to ``n`` live item ids with their
    inner products, never returning retired, unavailable or excluded items.
    """

    def __init__(self, dim: int, exact_threshold: int = 50_000, approximate_kind: str = "ivf",
                 hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 256,
                 ivf_nprobe: int = 16, device: str = "cpu", seed: int = 0) -> None:
        self.dim = dim
        self.ann = AnnStructure(dim, AnnParams(
            exact_threshold, approximate_kind, hnsw_m, ef_construction, ef_search,
            ivf_nprobe, device, seed))
        self._lock = threading.RLock()
        self._reset_storage(0)
        self._n_unavailable = 0
        self._deferred = False  # in a bulk load: FAISS is built once, at its end
        # rows ranked by smoothed CTR, with the index version and impression count they
        # were ranked at
        self._engaging: tuple[int, float, np.ndarray] = (-1, 0.0, np.zeros(0, dtype=np.int64))
        # item id -> (index version, its nearest servable rows, whether that is all of them)
        self._neighbours: LRUCache[str, tuple[int, np.ndarray, bool]] = LRUCache(NEIGHBOURS_KEPT)
        self._scratch: np.ndarray | None = None  # see _scratch_mask
        # see record: (shown, clicked, expected clicks of the shown)
        self._uncounted: deque[tuple[Sequence[str], Sequence[str],
                                     Sequence[float] | None]] = deque()
        self._totals = np.zeros(N_STATS)  # every item's counts, summed
        self.version = 0  # bumped on every change, so caches keyed on it stay valid
        # bumped only when an id joins or leaves: caches of the id set keyed on it
        # (a sorted listing) survive re-embeddings and availability changes
        self.ids_version = 0
        # bumped whenever rows move (compaction): rows a caller holds stay valid until then
        self.row_generation = 0

    @property
    def backend(self) -> str:
        """Where searches run: ``faiss-cpu``, ``faiss-gpu`` or ``torch-cuda``."""
        return self.ann.backend

    # -- storage ---------------------------------------------------------------
    def _reset_storage(self, capacity: int) -> None:
        self._vectors = np.zeros((max(capacity, 1024), self.dim), dtype=np.float32)
        self._ids = np.empty(max(capacity, 1024), dtype=object)
        self._live = np.zeros(max(capacity, 1024), dtype=bool)
        # live and available: what retrieval may return
        self._servable = np.zeros(max(capacity, 1024), dtype=bool)
        # per-row engagement counts [shown, clicked, expected clicks], for the
        # popularity features (``models.state.popularity_features``)
        self._stats = np.zeros((max(capacity, 1024), N_STATS), dtype=np.float32)
        # per-row hashed multi-hot of the item's tags (``models.state.tag_vectors``)
        self._tags = np.zeros((max(capacity, 1024), TAG_BUCKETS), dtype=np.uint8)
        # per-row ``hash(item_id)``: requests match candidates to a user's own history
        # by these (``models.batch.own_history_features``), never touching the ids
        self._hashes = np.zeros(max(capacity, 1024), dtype=np.int64)
        self._n_rows = 0
        self._row_of: dict[str, int] = {}
        self._n_dead = 0

    def _grow(self, needed: int, exact: bool = False) -> None:
        """Make room for ``needed`` rows: double the capacity (amortised appends), or
        allocate exactly ``needed`` when the final size is known (a bulk load)."""
        capacity = len(self._live)
        if needed <= capacity:
            return
        self._resize(needed if exact else max(needed, capacity * 2))

    def _resize(self, new_cap: int) -> None:
        """Move the first ``_n_rows`` rows into arrays of ``new_cap`` rows. The old and new
        arrays coexist for a moment: a 1M-item catalog should be sized once, up front
        (``begin_bulk_load``), not doubled while it grows (1.5 GB of vectors, not 2.4 GB
        at the last doubling)."""
        n = self._n_rows
        vectors = np.zeros((new_cap, self.dim), dtype=np.float32)
        vectors[:n] = self._vectors[:n]
        self._vectors = vectors
        ids = np.empty(new_cap, dtype=object)
        ids[:n] = self._ids[:n]
        live = np.zeros(new_cap, dtype=bool)
        live[:n] = self._live[:n]
        servable = np.zeros(new_cap, dtype=bool)
        servable[:n] = self._servable[:n]
        stats = np.zeros((new_cap, N_STATS), dtype=np.float32)
        stats[:n] = self._stats[:n]
        tags = np.zeros((new_cap, TAG_BUCKETS), dtype=np.uint8)
        tags[:n] = self._tags[:n]
        hashes = np.zeros(new_cap, dtype=np.int64)
        hashes[:n] = self._hashes[:n]
        self._ids, self._live, self._servable, self._stats = ids, live, servable, stats
        self._tags, self._hashes = tags, hashes

    def begin_bulk_load(self, expected: int = 0) -> None:
        """Start adding many items; the FAISS structure is built once, by
        ``finish_bulk_load``.

        Without it, a catalog loaded in chunks is indexed flat, then as IVF trained on
        the first 50k items, then retrained at 4x that, and so on: repeated k-means and
        rebuilds that cost start-up time and memory. Searches made meanwhile do not see
        the rows added since, so use it on a process that is not serving yet. The
        storage is sized for ``expected`` more rows at once.
        """
        with self._lock:
            self._grow(self._n_rows + expected, exact=True)
            self._deferred = True

    def finish_bulk_load(self) -> None:
        """Build the FAISS structure over everything added since ``begin_bulk_load``
        (blocking: minutes of k-means at 1M items on two cores)."""
        with self._lock:
            if not self._deferred:
                return
            self._deferred = False
            self._rebuild(self.ann.wanted_kind(len(self._row_of)))
            self.version += 1

    @property
    def approximate(self) -> bool:
        return self.ann.approximate

    @property
    def kind(self) -> str:
        """``flat`` (exact), ``ivf`` or ``hnsw``."""
        return self.ann.kind

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    # -- mutation --------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               available: Sequence[bool] | None = None,
               tags: Sequence[Sequence[str]] | None = None) -> None:
        """Add or replace items. Unavailable items are stored but never retrieved;
        ``tags`` (per item) feed the per-candidate tag-affinity features."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        avail = np.ones(len(ids), dtype=bool) if available is None else np.asarray(available)
        with self._lock:
            self._count_queued()  # before the counts are carried to the new rows
            # The last occurrence of a repeated id within one call wins.
            last = {item_id: i for i, item_id in enumerate(ids)}
            order = sorted(last.values())
            carried = {ids[i]: self._stats[self._row_of[ids[i]]].copy()
                       for i in order if ids[i] in self._row_of}  # re-embedding keeps counts
            if len(carried) < len(order):
                self.ids_version += 1
            for i in order:
                self._retire(ids[i])
            start = self._n_rows
            self._grow(start + len(order))
            rows = np.arange(start, start + len(order))
            self._vectors[rows] = vectors[order]
            self._ids[rows] = [ids[i] for i in order]
            self._hashes[rows] = [hash(ids[i]) for i in order]
            self._live[rows] = True
            self._servable[rows] = avail[order].astype(bool)
            self._n_unavailable += int((~self._servable[rows]).sum())
            self._n_rows += len(order)
            self._stats[rows] = 0.0
            self._tags[rows] = 0 if tags is None else tag_vectors([tags[i] for i in order])
            for row, i in zip(rows.tolist(), order, strict=True):
                self._row_of[ids[i]] = row
                if ids[i] in carried:
                    self._stats[row] = carried[ids[i]]
            if not self._deferred:
                self.ann.add(self._vectors[rows])
                self._maybe_rebuild()
            self.version += 1

    def set_available(self, item_id: str, available: bool) -> None:
        with self._lock:
            row = self._row_of.get(item_id)
            if row is None or bool(self._servable[row]) == available:
                return
            self._servable[row] = available
            self._n_unavailable += -1 if available else 1
            self.version += 1

    def remove(self, ids: Iterable[str]) -> int:
        """Retire items; returns how many existed."""
        with self._lock:
            self._count_queued()  # counts recorded before the removal die with the item
            removed = sum(1 for item_id in ids if self._retire(item_id))
            if removed:
                self.ids_version += 1
                self._maybe_rebuild()
                self.version += 1
            return removed

    def _retire(self, item_id: str) -> bool:
        row = self._row_of.pop(item_id, None)
        if row is None:
            return False
        self._live[row] = False
        if not self._servable[row]:
            self._n_unavailable -= 1
        self._servable[row] = False
        self._n_dead += 1
        return True

    def _maybe_rebuild(self) -> None:
        if self._deferred:
            return
        live = len(self._row_of)
        want = self.ann.wanted_kind(live)
        if self._n_rows and (self._n_dead > COMPACT_FRACTION * self._n_rows
                             or want != self.ann.kind or self.ann.outgrown(live)):
            self._rebuild(want)

    def _rebuild(self, kind: str) -> None:
        """Compact retired rows away and rebuild the FAISS structure over the rest.

        Compaction moves live rows down in place, a chunk at a time (row ``i`` of the
        result comes from a row at or after ``i``, so nothing unread is overwritten):
        no second copy of the vectors exists at any moment."""
        rows = np.flatnonzero(self._live[: self._n_rows])
        n = len(rows)
        if n < self._n_rows:
            for start in range(0, n, COMPACT_CHUNK):
                chunk = rows[start:start + COMPACT_CHUNK]
                self._vectors[start:start + len(chunk)] = self._vectors[chunk]
            self._ids[:n] = self._ids[rows]
            self._servable[:n] = self._servable[rows]
            self._stats[:n] = self._stats[rows]
            self._tags[:n] = self._tags[rows]
            self._hashes[:n] = self._hashes[rows]
            self._live[:n] = True
            self._ids[n: self._n_rows] = None
            self._live[n: self._n_rows] = False
            self._servable[n: self._n_rows] = False
            self._stats[n: self._n_rows] = 0.0
            self._tags[n: self._n_rows] = 0
            self._hashes[n: self._n_rows] = 0
            self._vectors[n: self._n_rows] = 0.0
        self._n_rows = n
        self._n_dead = 0
        self.row_generation += 1
        if len(self._live) > 2 * max(n, 1024):  # most of the catalog went: give memory back
            self._resize(max(n, 1024))
        self._row_of = {item_id: i for i, item_id in enumerate(self._ids[:n].tolist())}
        self.ann.rebuild(kind, self._vectors[:n])

    # -- queries ---------------------------------------------------------------
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._row_of)

    def vectors_of(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Embeddings of the known ids among ``ids`` (order kept, unknown ids dropped)."""
        with self._lock:
            found, rows = self._known_rows(ids)
            return list(compress(ids, found.tolist())), self._vectors[rows]

    def _known_rows(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``ids`` are indexed (a bool per id) and their rows, in order: one
        dict probe per id, by ``map`` in C (call with the lock held)."""
        rows = np.fromiter(map(self._row_of.get, ids, repeat(-1)), dtype=np.int64,
                           count=len(ids))
        found = rows >= 0
        return found, rows[found]

    def vectors_and_tags_of(self, ids: Sequence[str]
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which of ``ids`` are known (a bool per id), and the known ones' embeddings
        and tag multi-hots (float32), in order: what a user's state is built from, in
        one dict probe per id."""
        with self._lock:
            found, rows = self._known_rows(ids)
            return found, self._vectors[rows], self._tags[rows].astype(np.float32)

    def record(self, shown: Sequence[str], clicked: Sequence[str] = (),
               expected: Sequence[float] | None = None) -> None:
        """Count impressions and positive feedback of items (unknown ids are ignored),
        and, per shown item, the click probability the policy expected of it without
        its own popularity (``expected``; the catalog's CTR so far when not given).

        Never waits for the index's lock: the serving event loop calls this for every
        slate and every click, while a compute thread may hold the lock for a whole
        batched search. The counts are queued and applied now if the lock is free,
        else by the next holder before it reads or moves any counts."""
        self._uncounted.append((shown, clicked, expected))
        if self._lock.acquire(blocking=False):
            try:
                self._count_queued()
            finally:
                self._lock.release()

    def _count_queued(self) -> None:
        """Apply the counts ``record`` queued (call with the lock held)."""
        while self._uncounted:
            shown, clicked, expected = self._uncounted.popleft()
            per_item = repeat(self.base_ctr(), len(shown)) if expected is None else expected
            for item_id, p in zip(shown, per_item, strict=True):
                row = self._row_of.get(item_id)
                if row is not None:
                    self._stats[row, 0] += 1.0
                    self._stats[row, 2] += p
                    self._totals[0] += 1.0
                    self._totals[2] += p
            for item_id in clicked:
                row = self._row_of.get(item_id)
                if row is not None:
                    self._stats[row, 1] += 1.0
                    self._totals[1] += 1.0

    def base_ctr(self) -> float:
        """The CTR of every item shown so far: what an item nobody has seen yet is
        assumed to earn (``models.state.smoothed_ctr``'s prior), so the popularity
        features read as a lift over this catalog's own rate, whatever it is."""
        shown, clicked, _ = self._totals
        return float((clicked + PRIOR_CTR * PRIOR_WEIGHT) / (shown + PRIOR_WEIGHT))

    def expected_scale(self) -> float:
        """Clicks over expected clicks across the catalog: what makes the popularity
        lift (``models.state.popularity_features``) 0 for the catalog as a whole,
        however the policy that recorded the expectations was calibrated."""
        _, clicked, expected = self._totals
        prior = PRIOR_CTR * PRIOR_WEIGHT
        return float((clicked + prior) / (expected + prior))

    def _per_id(self, tables: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        """Rows of each per-row table for ``ids``, as float32 (copies); zeros for
        unknown ids. One id-to-row lookup serves every table (a dict probe per id,
        done by ``map`` in C; serving reads candidates by row instead, ``at_rows``)."""
        with self._lock:
            self._count_queued()
            rows = np.fromiter(map(self._row_of.get, ids, repeat(-1, len(ids))),
                               dtype=np.int64, count=len(ids))
            unknown = rows < 0
            out = [table[np.maximum(rows, 0)].astype(np.float32) for table in tables]
            if unknown.any():
                for o in out:
                    o[unknown] = 0.0
            return out

    def stats_and_tags_of(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(len(ids), 2)`` [shown, clicked] counts and ``(len(ids), TAG_BUCKETS)`` tag
        multi-hots, float32; zeros for unknown ids. For what a request names by id;
        retrieved candidates are read by row (``at_rows``)."""
        stats, tags = self._per_id([self._stats, self._tags], ids)
        return stats, tags

    def is_recommendable(self, item_id: str) -> bool:
        row = self._row_of.get(item_id)
        return row is not None and bool(self._servable[row])

    def recommendable_count(self) -> int:
        return len(self._row_of) - self._n_unavailable

    def rows_of(self, id_sets: Sequence[Iterable[str]]) -> list[np.ndarray]:
        """Per collection of item ids, the rows of those that are indexed, in order
        (unknown ids dropped). Rows are valid until ``row_generation`` changes."""
        with self._lock:
            get = self._row_of.get
            out = []
            for ids in id_sets:
                rows = np.fromiter(map(get, ids, repeat(-1)), dtype=np.int64)
                out.append(rows[rows >= 0])
            return out

    def at_rows(self, rows: Sequence[np.ndarray], generation: int
                ) -> list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] | None:
        """Per array of rows, the items' ids, ``[shown, clicked]`` counts, tag
        multi-hots (float32 copies) and id hashes (``hash(item_id)``), or None if rows
        moved since ``generation``.

        What a request's candidates need beside their embeddings, read by row: the
        search gave rows, and looking each id up again costs a dictionary probe per
        candidate (cache misses in a 100k-entry dict: about 20% of a serving process's
        GIL time before rows were carried)."""
        with self._lock:
            if generation != self.row_generation:
                return None
            self._count_queued()
            return [(self._ids[r].tolist(), self._stats[r].astype(np.float32),
                     self._tags[r].astype(np.float32), self._hashes[r]) for r in rows]

    def servable_rows(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of those of ``ids`` that are indexed and servable, in order."""
        with self._lock:
            get = self._row_of.get
            rows = np.fromiter(map(get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
            rows = rows[rows >= 0]
            return rows[self._servable[rows]]

    def servable_vectors(self) -> tuple[int, np.ndarray]:
        """The index version and a copy of every servable item's embedding: what a
        learner takes its next actions from without taking this lock per search."""
        with self._lock:
            rows = np.flatnonzero(self._servable[: self._n_rows])
            return self.version, self._vectors[rows].copy()

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """The embeddings of ``rows`` (a copy)."""
        with self._lock:
            return self._vectors[rows].copy()

    def related(self, seeds: Sequence[Sequence[str]], n: int,
                     banned: Sequence[np.ndarray]) -> list[Hits]:
        """Per entry, the items nearest to each of its seed items (best first within a
        seed, seeds in the order given), ``n`` per seed, none excluded or repeated.

        The same as one ``search`` per seed with the seed's embedding as the query and
        the entry's exclusions, then dropping items an earlier seed already gave; but
        an item's neighbours change only when the catalog does, so each seed's ranked
        list is kept (``NEIGHBOURS_KEPT`` items, ``NEIGHBOUR_MARGIN`` deeper than asked)
        until the index changes, and a request only filters it. Unknown seeds are
        skipped. ``banned``: per entry, rows it must not return (``rows_of``).
        """
        with self._lock:
            self._fill_neighbours(seeds, n, banned)
            # membership by lookup in a per-row scratch mask (1: banned, 2: given by an
            # earlier seed), not by np.isin's sort: set, read, and cleared again
            mask = self._scratch_mask()
            out = []
            for entry_seeds, entry_banned in zip(seeds, banned, strict=True):
                taken: list[np.ndarray] = []
                mask[entry_banned] = 1
                try:
                    for seed in entry_seeds:
                        rows = self._neighbour_rows(seed)
                        rows = rows[(mask[rows] & 1) == 0][:n]
                        rows = rows[(mask[rows] & 2) == 0]
                        mask[rows] |= 2
                        taken.append(rows)
                finally:
                    mask[entry_banned] = 0
                    for rows in taken:
                        mask[rows] = 0
                rows = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
                out.append((rows, self._vectors[rows]))
            return out

    def _scratch_mask(self) -> np.ndarray:
        """A zeroed uint8 per row of storage, reused under the lock by whoever needs a
        membership test over rows (and left zeroed again)."""
        if self._scratch is None or len(self._scratch) < len(self._live):
            self._scratch = np.zeros(len(self._live), dtype=np.uint8)
        return self._scratch

    def _fill_neighbours(self, seeds: Sequence[Sequence[str]], n: int,
                         banned: Sequence[np.ndarray]) -> None:
        """Search, in one batched call, the neighbour lists that are missing, stale
        (the index changed) or too short for a request's exclusions."""
        depth: dict[str, int] = {}
        for entry_seeds, entry_banned in zip(seeds, banned, strict=True):
            for seed in entry_seeds:
                if seed not in self._row_of:
                    continue
                need = n + len(entry_banned)
                cached = self._neighbours.get(seed)
                if cached is None or cached[0] != self.version or \
                        (len(cached[1]) < need and not cached[2]):
                    depth[seed] = max(depth.get(seed, 0), n + max(len(entry_banned),
                                                                   NEIGHBOUR_MARGIN))
        if not depth:
            return
        missing = list(depth)
        deepest = max(depth.values())
        queries = self._vectors[[self._row_of[seed] for seed in missing]]
        no_bans = [np.zeros(0, dtype=np.int64)] * len(missing)
        for seed, (rows, _) in zip(missing, self.search(queries, deepest, no_bans),
                                   strict=True):
            self._neighbours.put(seed, (self.version, rows.astype(np.int32),
                                        len(rows) < deepest))

    def _neighbour_rows(self, seed: str) -> np.ndarray:
        """The servable rows nearest to ``seed``'s embedding, best first, from its list
        (``_fill_neighbours`` made it fresh and deep enough for the request)."""
        cached = self._neighbours.get(seed) if seed in self._row_of else None
        if cached is None:
            return np.zeros(0, dtype=np.int64)
        return cached[1].astype(np.int64)

    def engaging(self, n: int, banned: Sequence[np.ndarray]) -> list[Hits]:
        """Per entry of ``banned`` (rows, ``rows_of``), the ``n`` servable items with the
        highest smoothed CTR (``models.state.smoothed_ctr`` of the counts ``record``
        keeps) that it does not name, best first: their rows and embeddings.

        A second candidate source beside the embedding search: an item that engages
        users more than its text suggests is far from every query in embedding space,
        so the search alone would never let the Q-network (whose popularity features
        value it) see it. The ranking is shared by all queries and refreshed every
        ``ENGAGING_REFRESH_IMPRESSIONS`` impressions; a query then only filters it.
        """
        with self._lock:
            if n <= 0 or not self._n_rows:
                return [self._no_hits() for _ in banned]
            ranked = self._engagement_ranking(n + max((len(b) for b in banned), default=0))
            mask = self._scratch_mask()  # membership by lookup, not np.isin's sort
            out = []
            for rows in banned:
                mask[rows] = 1
                try:
                    pick = ranked[mask[ranked] == 0][:n]
                finally:  # the mask is shared: never leave rows set in it
                    mask[rows] = 0
                out.append((pick, self._vectors[pick]))
            return out

    def _no_hits(self) -> Hits:
        return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)

    def _engagement_ranking(self, wanted: int) -> np.ndarray:
        """Servable rows by decreasing smoothed CTR: at least ``wanted`` of them (or all),
        from the cache unless the index changed, the cache is short, or it is stale."""
        self._count_queued()
        version, at, rows = self._engaging
        now = self._totals[0]
        if (version == self.version and now - at < ENGAGING_REFRESH_IMPRESSIONS
                and (len(rows) >= wanted or len(rows) == self.recommendable_count())):
            return rows
        servable = np.flatnonzero(self._servable[: self._n_rows])
        ctr = smoothed_ctr(self._stats[servable], self.base_ctr())
        keep = min(len(servable), max(2 * wanted, 256))  # room for the next calls' exclusions
        if keep < len(servable):
            top = np.argpartition(-ctr, keep - 1)[:keep]
        else:
            top = np.arange(len(servable))
        rows = servable[top[np.argsort(-ctr[top], kind="stable")]]
        self._engaging = (self.version, now, rows)
        return rows

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, ok: np.ndarray, n: int,
                slots: np.ndarray, results: list) -> None:
        """Order each query's surviving rows by the exact float32 inner product, in one
        batched product (no per-candidate Python), and keep the top ``n``."""
        vectors = self._vectors[rows]  # (queries, fetch, dim)
        exact = np.einsum("qfd,qd->qf", vectors, queries)
        exact[~ok] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :n]
        counts = np.minimum(ok.sum(1), n)
        for j, slot in enumerate(slots.tolist()):
            pick = order[j, : counts[j]]
            results[slot] = (rows[j, pick], vectors[j, pick])

    def search(self, queries: np.ndarray, n: int,
               banned_rows: Sequence[np.ndarray] | None = None) -> list[Hits]:
        """Top-``n`` live, available items per query that its ``banned_rows`` (rows,
        ``rows_of``) do not name: their rows and embeddings (``(m, dim)``, ``m <= n``),
        by decreasing inner product. ``at_rows`` reads the rest of their data by row."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if banned_rows is None:
            banned_rows = [NO_ROWS] * len(queries)
        with self._lock:
            results: list[Hits] = [self._no_hits() for _ in range(len(queries))]
            if not self._n_rows:
                return results
            servable = self.recommendable_count()
            # Over-fetch in proportion to what filtering drops (retired and unavailable
            # rows are spread through the index), and widen until enough survive.
            extra = max((len(b) for b in banned_rows), default=0)
            kept = max(servable / self._n_rows, 0.05)
            fetch = min(self._n_rows, int((n + extra) / kept) + 8)
            if self.ann.kind == "ivf":  # 8-bit codes: fetch a margin for the exact re-rank
                fetch = min(self._n_rows, fetch + n // 4)
            todo = np.arange(len(queries))
            while len(todo) and fetch > 0:
                found = self.ann.search(queries[todo], fetch, self._n_rows)
                rows = np.maximum(found, 0)
                ok = (found >= 0) & self._servable[rows]
                mask = self._scratch_mask()
                for t, q in enumerate(todo.tolist()):
                    if len(banned_rows[q]):
                        mask[banned_rows[q]] = 1
                        ok[t] &= mask[rows[t]] == 0
                        mask[banned_rows[q]] = 0
                banned = np.array([len(banned_rows[q]) for q in todo.tolist()])
                need = np.minimum(n, servable - banned)
                retry = (ok.sum(1) < need) & (fetch < self._n_rows)
                done = ~retry
                if done.any():
                    self._rerank(queries[todo[done]], rows[done], ok[done], n,
                                 todo[done], results)
                todo = todo[retry]
                fetch = min(self._n_rows, fetch * 2)
            return results
