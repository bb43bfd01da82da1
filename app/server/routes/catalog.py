"""Catalog routes: upsert, read, delete items; similar items; the popular list."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from app.errors import APIError
from app.schemas import Id, ItemOut, ItemsIn, ScoredItemsOut, UpsertOut
from app.server.routes.deps import ADMIN, ADMIN_ERRORS, V1, EngineDep

router = APIRouter(prefix=V1)


@router.post("/items", response_model=UpsertOut, dependencies=ADMIN, responses=ADMIN_ERRORS)
async def upsert_items(body: ItemsIn, engine: EngineDep):
    size = await engine.upsert_items(body.items)
    return {"upserted": len({it.item_id for it in body.items}), "catalog_size": size}


@router.get("/items/{item_id}", response_model=ItemOut)
async def get_item(item_id: Id, engine: EngineDep):
    found = (await engine.store.get_items([item_id])).get(item_id)
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
