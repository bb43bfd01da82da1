"""Model routes: the served version and its learning, rollback, importance, the log."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Query

from app.schemas import ErrorOut, ImportanceOut, LogOut, ModelOut, RollbackOut
from app.server.routes.deps import ADMIN, ADMIN_ERRORS, V1, EngineDep
from app.store import StoreUnavailable

router = APIRouter(prefix=V1)


@router.get("/model", response_model=ModelOut, response_model_exclude_unset=True)
async def model(engine: EngineDep):
    with contextlib.suppress(StoreUnavailable):
        await engine.refresh_weights()
    stats = engine.learner_stats
    return ModelOut(version=max(engine.scorer.version, int(stats.get("version", 0))),
                    updates=int(stats.get("updates", 0)),
                    feedback_learned=int(stats.get("feedback_learned", 0)),
                    epsilon=engine.epsilon,
                    pending_impressions=int(stats.get("pending_impressions", 0)),
                    device=engine.device, **engine.ensemble_report)


@router.post("/model/rollback", response_model=RollbackOut, dependencies=ADMIN,
             responses={**ADMIN_ERRORS, 409: {"model": ErrorOut,
                                              "description": "no earlier version kept"}})
async def rollback(engine: EngineDep):
    """Serve again the weights the current version replaced. They are published as
    a new version, so every replica follows; the learner continues from them."""
    version, restored = await engine.rollback()
    return RollbackOut(version=version, restored_from=restored)


@router.get("/model/importance", response_model=ImportanceOut, dependencies=ADMIN,
            responses=ADMIN_ERRORS)
async def model_importance(engine: EngineDep, limit: int = Query(500, ge=1, le=10_000)):
    """How much the served model relies on each part of its input: each part of the
    state, and each group of per-candidate features, is zeroed in turn on the
    latest ``limit`` closed impressions still stored, and the change of Q measured."""
    return await engine.importance(limit)


@router.get("/log", response_model=LogOut, dependencies=ADMIN, responses=ADMIN_ERRORS)
async def evaluation_log(engine: EngineDep,
                         limit: int = Query(10_000, ge=1, le=1_000_000)):
    """Closed impressions (slate, logged propensities, rewards) for off-policy
    evaluation; ``recsvc export-log`` and ``recsvc ope`` read this."""
    return {"records": await engine.store.impressions.read_log(limit)}
