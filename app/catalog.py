"""This process's copy of the catalog: the FAISS index, kept in step with the store.

Every API replica and the learner hold the whole catalog's embeddings in memory.
A change made through one replica is applied to that replica's index at once and
announced in the store (``CatalogStore.catalog_changes``); the others read the
announcements every ``weights_poll_s`` and apply them by re-reading the changed
items: an item still stored is (re)indexed, one gone is removed. When the
announcements they missed were trimmed away, they reload the whole catalog.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import numpy as np

from app.store import ItemRecord, StoreUnavailable
from app.store.base import CatalogStore
from models.index import CandidateIndex

log = logging.getLogger("recsvc.catalog")

LOAD_CHUNK = 5000

# runs blocking index work off the event loop: ``await run(fn, *args)``
Runner = Callable[..., Awaitable]


def index_records(index: CandidateIndex, records: list[ItemRecord]) -> None:
    """Put stored items (embeddings, availability and tags) into the index."""
    if not records:
        return
    vectors = np.stack([np.frombuffer(r.embedding, dtype=np.float32) for r in records])
    index.upsert([r.item_id for r in records], vectors, [r.available for r in records],
                 [r.tags for r in records])


class CatalogReplica:
    def __init__(self, store: CatalogStore, index: CandidateIndex, run: Runner,
                 origin: str | None = None) -> None:
        self.store = store
        self.index = index
        self.run = run
        # what this process announces its own changes as, so it skips them when following
        self.origin = origin or uuid.uuid4().hex
        self.seen = "0"  # id of the newest change applied
        self.loaded = False

    async def load(self) -> None:
        """Index the stored catalog (a restart re-embeds nothing). The change id is read
        first, so a change made while loading is applied again afterwards, not missed.

        At start-up (an empty index) the storage is sized from the catalog's count and
        the FAISS structure is built once, after the last chunk: a 1M-item replica
        then peaks near its steady memory instead of rebuilding at every growth step.
        A reload into a serving index keeps it searchable throughout instead."""
        seen = await self.store.last_catalog_change()
        ids = await self.store.all_item_ids()
        fresh = len(self.index) == 0 and bool(ids)
        if fresh:
            await self.run(self.index.begin_bulk_load, len(ids))
        try:
            for start in range(0, len(ids), LOAD_CHUNK):
                records = await self.store.get_items(ids[start:start + LOAD_CHUNK])
                await self.run(index_records, self.index, list(records.values()))
                log.info("catalog: read %d/%d items", min(start + LOAD_CHUNK, len(ids)),
                         len(ids))
        finally:
            if fresh:
                log.info("catalog: building the index over %d items", len(self.index))
                await self.run(self.index.finish_bulk_load)
                log.info("catalog: index built (%s)", self.index.kind)
        gone = set(await self.run(self.index.ids)) - set(ids)
        if gone:  # a reload after missed changes: items deleted meanwhile
            await self.run(self.index.remove, list(gone))
        self.seen = seen
        self.loaded = True

    async def follow(self) -> int:
        """Apply the changes other processes announced; returns how many items changed."""
        if not self.loaded:
            await self.load()
            return len(self.index)
        changed = 0
        while True:
            changes, complete = await self.store.catalog_changes(self.seen)
            if not complete:
                log.warning("catalog changes were trimmed before this process read them: "
                            "reloading the catalog")
                await self.load()
                return len(self.index)
            if not changes:
                return changed
            ids = list(dict.fromkeys(i for _, origin, item_ids in changes
                                     if origin != self.origin for i in item_ids))
            if ids:
                await self.apply(ids)
                changed += len(ids)
            self.seen = changes[-1][0]

    async def apply(self, ids: list[str]) -> None:
        """Make the index hold what the store holds for these items."""
        records = await self.store.get_items(ids)
        await self.run(index_records, self.index, list(records.values()))
        gone = [i for i in ids if i not in records]
        if gone:
            await self.run(self.index.remove, gone)

    async def try_load(self) -> None:
        """``load``, or start empty when the store is down (``follow`` loads it later)."""
        try:
            await self.load()
        except StoreUnavailable:
            log.warning("store unreachable at start-up: starting with an empty catalog")
