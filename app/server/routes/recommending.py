"""Recommending and what follows it: slates, feedback on them, and plain events."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from app.errors import APIError, FastJSONResponse
from app.schemas import (
    EventIn,
    EventOut,
    FeedbackBatchIn,
    FeedbackBatchOut,
    FeedbackIn,
    FeedbackOut,
    RecommendIn,
    RecommendOut,
    SeenIn,
    SeenOut,
    SlateItem,
    first_error,
)
from app.server.engine import Engine
from app.server.routes.deps import V1, EngineDep
from app.store.base import FeedbackOutcome

router = APIRouter(prefix=V1)


def feedback_answer(event: FeedbackIn, out: FeedbackOutcome) -> tuple[int, dict]:
    """The status and body that answer one feedback event: ``POST /v1/feedback``'s, and
    each result of ``POST /v1/feedback/batch``."""
    if out.status == "unknown_request":
        return 404, {"error": {"code": "unknown_request", "message":
                               f"request_id {event.request_id!r} is unknown or expired"}}
    if out.status == "not_in_slate":
        return 422, {"error": {"code": "item_not_in_slate",
                               "message": f"item_id: {event.item_id!r} was not in that slate"}}
    duplicate = out.status == "duplicate"
    return (200 if duplicate else 202), {"accepted": True, "reward": out.reward,
                                         "duplicate": duplicate}


# without "explain", items carry no explanation field at all: API.md's body exactly
@router.post("/recommend", response_model=RecommendOut, response_model_exclude_none=True)
async def recommend(body: RecommendIn, engine: EngineDep):
    slate = await engine.recommend(
        body.user_id, body.context.text if body.context else None, body.k, body.exclude,
        exclude_seen=body.exclude_seen, candidates=body.candidates, explore=body.explore,
        explain=body.explain, defer_seen=body.defer_seen)
    c = slate.choice
    if slate.explanations is None:  # the common case: straight to JSON, no models
        return FastJSONResponse({
            "request_id": slate.request_id, "model_version": slate.model_version,
            "items": [{"item_id": i, "score": s, "explored": e, "propensity": p}
                      for i, s, e, p in zip(slate.item_ids, slate.scores.tolist(),
                                            c.explored.tolist(), c.propensities.tolist(),
                                            strict=True)]})
    items = [SlateItem(item_id=i, score=float(s), explored=bool(e), propensity=float(p),
                       explanation=x)
             for i, s, e, p, x in zip(slate.item_ids, slate.scores, c.explored,
                                      c.propensities, slate.explanations, strict=True)]
    return RecommendOut(request_id=slate.request_id, model_version=slate.model_version,
                        items=items)


@router.post("/seen", response_model=SeenOut, status_code=202)
async def seen(body: SeenIn, engine: EngineDep):
    """v1.1: which items of a ``defer_seen`` slate were displayed; only those (and any
    that got feedback, which shows they were) are learned from."""
    out = await engine.seen(body.request_id, body.item_ids)
    if out == "unknown_request":
        raise APIError(404, "unknown_request",
                       f"request_id {body.request_id!r} is unknown or expired")
    if out != "accepted":
        raise APIError(422, "item_not_in_slate", f"item_ids: {out!r} was not in that slate")
    return {"accepted": True, "seen": len(set(body.item_ids))}


@router.post("/feedback", response_model=FeedbackOut, status_code=202,
             responses={200: {"model": FeedbackOut, "description": "duplicate"}})
async def feedback(body: FeedbackIn, engine: EngineDep):
    status, answer = feedback_answer(body, await engine.feedback(
        body.request_id, body.item_id, body.event, body.value))
    if "error" in answer:
        raise APIError(status, answer["error"]["code"], answer["error"]["message"])
    return FastJSONResponse(answer, status_code=status)


@router.post("/feedback/batch", response_model=FeedbackBatchOut,
             response_model_exclude_none=True)
async def feedback_batch(body: FeedbackBatchIn, engine: EngineDep):
    """Up to 1,000 feedback events, each answered as it would be alone; they are
    written together (the store's pipelines batch concurrent events)."""
    async def one(raw: dict) -> dict:
        try:
            event = FeedbackIn.model_validate(raw)
        except ValidationError as exc:
            return {"status": 422, "error": {"code": "validation_error",
                                             "message": first_error(exc.errors())}}
        status, answer = feedback_answer(event, await engine.feedback(
            event.request_id, event.item_id, event.event, event.value))
        return {"status": status, **answer}

    # a StoreUnavailable from any event makes the whole call 503
    return {"results": await asyncio.gather(*(one(e) for e in body.events))}


@router.post("/events", response_model=EventOut, status_code=202)
async def events(body: EventIn, engine: EngineDep):
    if not (await engine.store.catalog.get_items([body.item_id])):
        raise APIError(404, "item_not_found", f"no item {body.item_id!r}")
    await engine.add_event(body.user_id, body.item_id, body.event, body.value)
    return {"accepted": True}


async def lean_recommend(body: BaseModel, engine: Engine) -> Response | None:
    """``recommend``'s answer where it is a ``Response`` (no explanations asked for);
    ``None`` leaves the request to FastAPI (``app.server.lean_routes``)."""
    assert isinstance(body, RecommendIn)
    if body.explain:
        return None
    answer = await recommend(body, engine)
    assert isinstance(answer, Response)
    return answer


async def lean_feedback(body: BaseModel, engine: Engine) -> Response | None:
    """``feedback``'s answer (a ``Response``, or an ``APIError`` raised)."""
    assert isinstance(body, FeedbackIn)
    return await feedback(body, engine)


def lean_routes() -> list[tuple[APIRoute, type[BaseModel], Any]]:
    """The routes ``app.server.lean_routes`` answers in their common case."""
    by_path = {r.path: r for r in router.routes if isinstance(r, APIRoute)}
    return [(by_path[f"{V1}/recommend"], RecommendIn, lean_recommend),
            (by_path[f"{V1}/feedback"], FeedbackIn, lean_feedback)]
