"""The Redis backend's catalog and its cache of context embeddings."""

from __future__ import annotations

import orjson
from redis import exceptions as rexc

from app.store.base import CatalogChange, CatalogStore, EmbeddingCache, ItemRecord, change_id_key
from app.store.redis_core import RedisRole, _guard, _text

CATALOG_CHANGES_KEPT = 10_000


class RedisCatalog(RedisRole, CatalogStore):
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
        found = await self.core.hashes({i: self._item(i) for i in item_ids})
        return {i: ItemRecord(i, h[b"text"].decode(), orjson.loads(h[b"tags"]),
                              bool(int(h[b"available"])), h[b"emb"], h[b"text_key"].decode())
                for i, h in found.items()}

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


class RedisEmbeddings(RedisRole, EmbeddingCache):
    @_guard
    async def get_embedding(self, key: str) -> bytes | None:
        return await self.r.get(f"{self.p}:emb:{key}")

    @_guard
    async def put_embedding(self, key: str, vector: bytes, ttl_s: int) -> None:
        await self.r.set(f"{self.p}:emb:{key}", vector, ex=ttl_s)

