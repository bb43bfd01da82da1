"""User routes: a user's history, and erasing a user."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.schemas import HistoryEntry, Id, UserOut
from app.server.routes.deps import ADMIN, ADMIN_ERRORS, V1, EngineDep

router = APIRouter(prefix=V1)


@router.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: Id, engine: EngineDep):
    data = await engine.store.users.get_user(user_id)
    return UserOut(user_id=user_id, history=[HistoryEntry(**h) for h in data.history])


@router.delete("/users/{user_id}", status_code=204, response_class=Response,
               dependencies=ADMIN, responses=ADMIN_ERRORS)
async def delete_user(user_id: Id, engine: EngineDep):
    await engine.store.users.delete_user(user_id)
    return Response(status_code=204)
