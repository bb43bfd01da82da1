"""The HTTP API of API.md (v1), built by ``create_app``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from swagger_ui_bundle import swagger_ui_path

from app.auth import KeyRing, authenticate, require_admin
from app.engine import Engine
from app.errors import APIError, FastJSONResponse, install_error_handlers
from app.gate import RequestGate
from app.learner_worker import LearnerWorker
from app.metrics import Metrics
from app.middleware import MetricsMiddleware
from app.schemas import (
    ErrorOut,
    EventIn,
    EventOut,
    FeedbackBatchIn,
    FeedbackBatchOut,
    FeedbackIn,
    FeedbackOut,
    HistoryEntry,
    Id,
    ImportanceOut,
    ItemOut,
    ItemsIn,
    LogOut,
    ModelOut,
    RecommendIn,
    RecommendOut,
    RollbackOut,
    ScoredItemsOut,
    SlateItem,
    UpsertOut,
    UserOut,
    first_error,
)
from app.settings import Settings
from app.store import Store, StoreUnavailable, make_store
from app.store.base import FeedbackOutcome

# the version of the HTTP contract the service implements (docs/api.md)
API_VERSION = "1.1"
# where Swagger UI's assets are served (see ``docs``)
DOCS_ASSETS = "/docs-assets"
log = logging.getLogger("recsvc.api")

_ERRORS = {s: {"model": ErrorOut} for s in (400, 401, 404, 413, 422, 429, 503)}
_ADMIN = [Depends(require_admin)]
_ADMIN_ERRORS = {403: {"model": ErrorOut, "description": "the key is not an admin key"}}


async def _engine(request: Request) -> Engine:
    # dependencies are ``async def`` (here and in app.auth): FastAPI runs a plain ``def``
    # dependency on a worker thread, a thread hop per request for a few attribute reads
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise APIError(503, "not_ready", "the service is starting", {"Retry-After": "1"})
    return engine


def _feedback_answer(event: FeedbackIn, out: FeedbackOutcome) -> tuple[int, dict]:
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


def create_app(settings: Settings | None = None, store: Store | None = None,
               encoder=None, run_learner: bool = True) -> FastAPI:
    """Build the service. The embedded learner runs in-process when ``run_learner``."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = store or make_store(settings)
        engine = Engine(settings, st, metrics, encoder)
        app.state.engine = engine
        await engine.start()
        learner = None
        if run_learner:
            learner = LearnerWorker(settings, st, engine.index, engine.layout, engine.device)
            await learner.start()
        app.state.learner = learner
        try:
            yield
        finally:
            if learner:
                await learner.stop()
            await engine.stop()
            if store is None:
                await st.close()
            log.info("shutdown complete")

    app = FastAPI(title="recsvc", version=API_VERSION,
                  description="Online recommendation service that learns from feedback "
                              "with reinforcement learning.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    # Swagger UI from the package's own copy of its assets: FastAPI's default page loads
    # them from a CDN, so it was blank wherever the service runs offline
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="recsvc API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keyring = KeyRing(settings.key_list, settings.admin_key_list)
    install_error_handlers(app)
    app.add_middleware(RequestGate, settings=settings, keyring=app.state.keyring,
                       metrics=metrics, store=lambda: getattr(
                           getattr(app.state, "engine", None), "store", None))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)],
                   responses=_ERRORS)

    # -- catalog -------------------------------------------------------------------------
    @v1.post("/items", response_model=UpsertOut, dependencies=_ADMIN, responses=_ADMIN_ERRORS)
    async def upsert_items(body: ItemsIn, engine: Engine = Depends(_engine)):
        size = await engine.upsert_items(body.items)
        return {"upserted": len({it.item_id for it in body.items}), "catalog_size": size}

    @v1.get("/items/{item_id}", response_model=ItemOut)
    async def get_item(item_id: Id, engine: Engine = Depends(_engine)):
        found = (await engine.store.get_items([item_id])).get(item_id)
        if found is None:
            raise APIError(404, "item_not_found", f"no item {item_id!r}")
        return {"item_id": found.item_id, "text": found.text, "tags": found.tags,
                "available": found.available}

    @v1.get("/items/{item_id}/similar", response_model=ScoredItemsOut)
    async def similar(item_id: Id, k: int = Query(10, ge=1, le=100),
                      engine: Engine = Depends(_engine)):
        found = await engine.similar(item_id, k)
        if found is None:
            raise APIError(404, "item_not_found", f"no item {item_id!r}")
        return {"items": [{"item_id": i, "score": v} for i, v in found]}

    @v1.get("/popular", response_model=ScoredItemsOut)
    async def popular(k: int = Query(10, ge=1, le=100), engine: Engine = Depends(_engine)):
        return {"items": [{"item_id": i, "score": v} for i, v in await engine.popular(k)]}

    @v1.delete("/items/{item_id}", status_code=204, response_class=Response,
               dependencies=_ADMIN, responses=_ADMIN_ERRORS)
    async def delete_item(item_id: Id, engine: Engine = Depends(_engine)):
        if not await engine.delete_item(item_id):
            raise APIError(404, "item_not_found", f"no item {item_id!r}")
        return Response(status_code=204)

    # -- recommending ----------------------------------------------------------------------
    # without "explain", items carry no explanation field at all: API.md's body exactly
    @v1.post("/recommend", response_model=RecommendOut, response_model_exclude_none=True)
    async def recommend(body: RecommendIn, engine: Engine = Depends(_engine)):
        slate = await engine.recommend(
            body.user_id, body.context.text if body.context else None, body.k, body.exclude,
            body.exclude_seen, body.candidates, body.explore, body.explain)
        c = slate.choice
        if slate.explanations is None:  # the common case: straight to JSON, no models
            return FastJSONResponse({
                "request_id": slate.request_id, "model_version": slate.model_version,
                "items": [{"item_id": i, "score": s, "explored": e, "propensity": p}
                          for i, s, e, p in zip(slate.item_ids, slate.scores.tolist(),
                                                c.explored.tolist(), c.propensities.tolist(),
                                                strict=True)]})
        why = slate.explanations
        items = [SlateItem(item_id=i, score=float(s), explored=bool(e), propensity=float(p),
                           explanation=x)
                 for i, s, e, p, x in zip(slate.item_ids, slate.scores, c.explored,
                                          c.propensities, why, strict=True)]
        return RecommendOut(request_id=slate.request_id, model_version=slate.model_version,
                            items=items)

    # -- feedback ------------------------------------------------------------------------
    @v1.post("/feedback", response_model=FeedbackOut, status_code=202,
             responses={200: {"model": FeedbackOut, "description": "duplicate"}})
    async def feedback(body: FeedbackIn, engine: Engine = Depends(_engine)):
        status, answer = _feedback_answer(body, await engine.feedback(
            body.request_id, body.item_id, body.event, body.value))
        if "error" in answer:
            raise APIError(status, answer["error"]["code"], answer["error"]["message"])
        return FastJSONResponse(answer, status_code=status)

    @v1.post("/feedback/batch", response_model=FeedbackBatchOut,
             response_model_exclude_none=True)
    async def feedback_batch(body: FeedbackBatchIn, engine: Engine = Depends(_engine)):
        """Up to 1,000 feedback events, each answered as it would be alone; they are
        written together (the store's pipelines batch concurrent events)."""
        async def one(raw: dict) -> dict:
            try:
                event = FeedbackIn.model_validate(raw)
            except ValidationError as exc:
                return {"status": 422, "error": {"code": "validation_error",
                                                 "message": first_error(exc.errors())}}
            status, answer = _feedback_answer(event, await engine.feedback(
                event.request_id, event.item_id, event.event, event.value))
            return {"status": status, **answer}

        # a StoreUnavailable from any event makes the whole call 503
        return {"results": await asyncio.gather(*(one(e) for e in body.events))}

    @v1.post("/events", response_model=EventOut, status_code=202)
    async def events(body: EventIn, engine: Engine = Depends(_engine)):
        if not (await engine.store.get_items([body.item_id])):
            raise APIError(404, "item_not_found", f"no item {body.item_id!r}")
        await engine.add_event(body.user_id, body.item_id, body.event, body.value)
        return {"accepted": True}

    # -- users -----------------------------------------------------------------------------
    @v1.get("/users/{user_id}", response_model=UserOut)
    async def get_user(user_id: Id, engine: Engine = Depends(_engine)):
        data = await engine.store.get_user(user_id)
        return UserOut(user_id=user_id, history=[HistoryEntry(**h) for h in data.history])

    @v1.delete("/users/{user_id}", status_code=204, response_class=Response,
               dependencies=_ADMIN, responses=_ADMIN_ERRORS)
    async def delete_user(user_id: Id, engine: Engine = Depends(_engine)):
        await engine.store.delete_user(user_id)
        return Response(status_code=204)

    # -- model -------------------------------------------------------------------------------
    @v1.get("/model", response_model=ModelOut, response_model_exclude_unset=True)
    async def model(engine: Engine = Depends(_engine)):
        with contextlib.suppress(StoreUnavailable):
            await engine.refresh_weights()
        stats = engine.learner_stats
        return ModelOut(version=max(engine.scorer.version, int(stats.get("version", 0))),
                        updates=int(stats.get("updates", 0)),
                        feedback_learned=int(stats.get("feedback_learned", 0)),
                        epsilon=engine.epsilon,
                        pending_impressions=int(stats.get("pending_impressions", 0)),
                        device=engine.device, **engine.ensemble_report)

    @v1.post("/model/rollback", response_model=RollbackOut, dependencies=_ADMIN,
             responses={**_ADMIN_ERRORS, 409: {"model": ErrorOut,
                                               "description": "no earlier version kept"}})
    async def rollback(engine: Engine = Depends(_engine)):
        """Serve again the weights the current version replaced. They are published as
        a new version, so every replica follows; the learner continues from them."""
        version, restored = await engine.rollback()
        return RollbackOut(version=version, restored_from=restored)

    @v1.get("/model/importance", response_model=ImportanceOut, dependencies=_ADMIN,
            responses=_ADMIN_ERRORS)
    async def model_importance(engine: Engine = Depends(_engine),
                               limit: int = Query(500, ge=1, le=10_000)):
        """How much the served model relies on each part of its input: each part of the
        state, and each group of per-candidate features, is zeroed in turn on the
        latest ``limit`` closed impressions still stored, and the change of Q measured."""
        return await engine.importance(limit)

    @v1.get("/log", response_model=LogOut, dependencies=_ADMIN, responses=_ADMIN_ERRORS)
    async def evaluation_log(engine: Engine = Depends(_engine),
                             limit: int = Query(10_000, ge=1, le=1_000_000)):
        """Closed impressions (slate, logged propensities, rewards) for off-policy
        evaluation; ``recsvc export-log`` and ``recsvc ope`` read this."""
        return {"records": await engine.store.read_log(limit)}

    app.include_router(v1)

    # -- operations ----------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=True)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    async def readyz(request: Request):
        """200 once this process can serve recommendations (encoder, index and catalog
        loaded), whatever the store's health: with the store unavailable it still
        serves them, degraded, so a load balancer must keep sending it traffic. The
        store's health is in the body (``store``) and in ``recsvc_store_up``."""
        engine: Engine | None = getattr(request.app.state, "engine", None)
        if engine is None or not engine.ready:
            raise APIError(503, "not_ready", "the service is starting", {"Retry-After": "1"})
        try:
            async with asyncio.timeout(2.0):
                await engine.store.check_writable()
            store, detail = "ok", None
        except (StoreUnavailable, TimeoutError) as exc:
            store, detail = "unavailable", str(exc) or type(exc).__name__
        metrics.store_up.set(1 if store == "ok" else 0)
        body = {"status": "ready", "catalog_size": len(engine.index), "store": store}
        if detail:
            body["store_detail"] = detail
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
