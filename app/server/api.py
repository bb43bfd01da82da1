"""The HTTP API of API.md (v1), built by ``create_app`` from the routers in
``app.server.routes``: one per area of the contract."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from app.auth import KeyRing, authenticate
from app.errors import install_error_handlers
from app.learner.worker import LearnerWorker
from app.metrics import Metrics
from app.schemas import ErrorOut
from app.server.engine import Engine
from app.server.gate import RequestGate
from app.server.lean_routes import install_lean_routes
from app.server.middleware import MetricsMiddleware
from app.server.routes import catalog, model, operations, recommending, users
from app.server.routes.operations import DASHBOARD_ASSETS, DASHBOARD_DIR, DOCS_ASSETS
from app.settings import Settings
from app.store import Store, make_store

# the version of the HTTP contract the service implements (docs/api.md)
API_VERSION = "1.1"
log = logging.getLogger("recsvc.api")

_ERRORS: dict[int | str, dict] = {
    s: {"model": ErrorOut} for s in (400, 401, 404, 413, 422, 429, 503)}


# FastAPI's own OpenTelemetry (0.165 on) looks up the global tracer, meter and logger
# providers in the environment on every request, about 5% of the event loop's time
# under feedback load; the service reports through its Prometheus metrics and logs.
# (Older FastAPI keeps unknown keywords in ``app.extra``.)
NO_NATIVE_TELEMETRY: Any = {"tracing": False, "metrics": False, "logs": False}


def app_of_worker() -> FastAPI:
    """The app of one worker process of ``recsvc serve --workers N``: uvicorn builds it
    in each worker, from that worker's settings (the environment). Each worker with
    ``RECSVC_ROLE=all`` runs a learner; they share the store's lease, so one learns
    and the others stand by, as learners beside API replicas do."""
    import threading

    from tqdm import tqdm

    from app.logs import configure

    # progress bars (the encoder's weights loading) would otherwise each make a
    # multiprocessing lock: a semaphore per worker that its exit leaves behind, which
    # Python's resource tracker reports as leaked at every stop
    tqdm.set_lock(threading.RLock())
    settings = Settings()
    configure(settings.log_level, settings.log_format)
    return create_app(settings, run_learner=settings.role == "all")


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
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry=NO_NATIVE_TELEMETRY)
    # Swagger UI from the package's own copy of its assets: FastAPI's default page loads
    # them from a CDN, so it was blank wherever the service runs offline
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
    # the dashboard's page script, styles and vendored charting library (uPlot)
    app.mount(DASHBOARD_ASSETS, StaticFiles(directory=DASHBOARD_DIR), name="dashboard-assets")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keyring = KeyRing(settings.key_list, settings.admin_key_list)
    install_error_handlers(app)
    app.add_middleware(RequestGate, settings=settings, keyring=app.state.keyring,
                       metrics=metrics, limits=lambda: getattr(
                           getattr(getattr(app.state, "engine", None), "store", None),
                           "limits", None))
    # outermost: counts and logs refusals too
    app.add_middleware(MetricsMiddleware, metrics=metrics, access_log=settings.access_log)

    for area in (catalog, recommending, users, model):  # the contract's /v1, with a key
        app.include_router(area.router, dependencies=[Depends(authenticate)],
                           responses=_ERRORS)
    app.include_router(operations.router)
    # the two routes of every event, in their common case without FastAPI's
    # per-request work; everything else still goes through FastAPI's routes
    install_lean_routes(app, recommending.lean_routes())
    return app
