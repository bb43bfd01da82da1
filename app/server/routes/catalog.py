"""Catalog routes: upsert, read, delete items; similar items; the popular list."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Query, Response

from app.errors import APIError
from app.schemas import Id, ItemOut, ItemsIn, ItemsPage, ScoredItemsOut, UpsertOut
from app.server.routes.deps import ADMIN, ADMIN_ERRORS, V1, EngineDep

router = APIRouter(prefix=V1)


@router.post("/items", response_model=UpsertOut, dependencies=ADMIN, responses=ADMIN_ERRORS)
async def upsert_items(body: ItemsIn, engine: EngineDep):
    size = await engine.upsert_items(body.items)
    return {"upserted": len({it.item_id for it in body.items}), "catalog_size": size}


def _cursor(after: str) -> str:
    """Opaque to clients: the last item id of the page, base64url without padding."""
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def _after(cursor: str) -> str:
    """The id a cursor continues after. One this service did not give (any base64url
    text is schema-valid) still names a place in id order: its decoded text, or the
    text itself when it does not decode."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return cursor


@router.get("/items", response_model=ItemsPage)
async def list_items(engine: EngineDep, limit: int = Query(100, ge=1, le=1000),
                     cursor: str | None = Query(None, max_length=256,
                                                pattern=r"^[A-Za-z0-9_-]+$")):
    """Every item once, in item-id order, a page at a time (``next_cursor``)."""
    items, after = await engine.list_items(limit, _after(cursor) if cursor else None)
    return {"items": [{"item_id": r.item_id, "text": r.text, "tags": r.tags,
                       "available": r.available} for r in items],
            "next_cursor": _cursor(after) if after is not None else None}


@router.get("/items/{item_id}", response_model=ItemOut)
async def get_item(item_id: Id, engine: EngineDep):
    found = (await engine.store.catalog.get_items([item_id])).get(item_id)
    if found is None:
        raise APIError(404, "item_not_found", f"no item {item_id!r}")
    return {"item_id": found.item_id, "text": found.text, "tags": found.tags,
            "available": found.available}


@router.get("/items/{item_id}/similar", response_model=ScoredItemsOut)
async def similar(item_id: Id, engine: EngineDep, k: int = Query(10, ge=1, le=100)):
    found = await engine.similar(item_id, k)
    if found is None:
        raise APIError(404, "item_not_found", f"no item {item_id!r}")
    return {"items": [{"item_id": i, "score": v} for i, v in found]}


@router.get("/popular", response_model=ScoredItemsOut)
async def popular(engine: EngineDep, k: int = Query(10, ge=1, le=100)):
    return {"items": [{"item_id": i, "score": v} for i, v in await engine.popular(k)]}


@router.delete("/items/{item_id}", status_code=204, response_class=Response,
               dependencies=ADMIN, responses=ADMIN_ERRORS)
async def delete_item(item_id: Id, engine: EngineDep):
    if not await engine.delete_item(item_id):
        raise APIError(404, "item_not_found", f"no item {item_id!r}")
    return Response(status_code=204)
