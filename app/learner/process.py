"""``recsvc learner``: the learner as its own process, beside API replicas (RECSVC_ROLE=api).

Run two or more for failover: the one holding the lease learns, the others wait
and take over within ``lease_ttl_s`` of its death. Each holds the catalog's
embeddings (it needs them for the next-state targets) and follows catalog
changes like an API replica. A small HTTP server answers the probes:

  GET /healthz   the process runs
  GET /readyz    the store answers and the catalog is loaded (503 otherwise)
  GET /status    consumer id, whether it holds the lease, its counters
  GET /metrics   Prometheus
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.auth import KeyRing
from app.catalog import CatalogReplica
from app.errors import APIError, install_error_handlers
from app.learner.worker import LearnerWorker
from app.loops import PeriodicLoop
from app.metrics import ReadAtScrape, new_registry
from app.settings import Settings
from app.store import StoreUnavailable, make_store
from models.ann import set_search_threads
from models.device import resolve_device
from models.encoder import embedding_dim
from models.index import CandidateIndex
from models.state import StateLayout

log = logging.getLogger("recsvc.learner.process")


def _metrics(registry: CollectorRegistry, app: FastAPI) -> None:
    """The learner's counters (``_total``) and levels, read when scraped."""
    def stat(name: str, default: float = 0.0) -> Callable[[], float]:
        def read() -> float:
            learner = getattr(app.state, "learner", None)
            return float(learner.stats().get(name, default)) if learner else default
        return read

    def learner_attr(name: str) -> Callable[[], float]:
        return lambda: float(getattr(getattr(app.state, "learner", None), name, 0) or 0)

    read = ReadAtScrape()
    registry.register(read)
    for name, doc in (("updates", "gradient steps"),
                      ("feedback_learned", "feedback events learned"),
                      ("transitions", "transitions learned")):
        read.counter(f"recsvc_learner_{name}", doc, stat(name))
    read.counter("recsvc_learner_takeovers", "times this learner took the lease",
                 learner_attr("takeovers"))
    for name, doc in (("version", "last weights version this learner knows"),
                      ("pending_impressions", "impressions waiting for their reward window")):
        read.gauge(f"recsvc_learner_{name}", doc, stat(name))
    read.gauge("recsvc_learner_loss", "latest training loss (Huber)", stat("loss", math.nan))
    read.gauge("recsvc_learner_active", "1 while this learner holds the lease",
               learner_attr("active"))


@asynccontextmanager
async def _learner_running(app: FastAPI, settings: Settings):
    """The learner process's life: the store, a catalog replica that follows it (the
    next actions are searched in it), and the learner worker."""
    store = make_store(settings)
    device = resolve_device(settings.device)
    pool = ThreadPoolExecutor(1, thread_name_prefix="recsvc-catalog")
    set_search_threads(settings.search_threads)  # the next-action searches'

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    dim = await run(embedding_dim, settings.encoder_path)
    index = CandidateIndex(dim, exact_threshold=settings.exact_index_max,
                           approximate_kind=settings.approximate_index,
                           hnsw_m=settings.hnsw_m, ef_search=settings.hnsw_ef_search,
                           ivf_nprobe=settings.ivf_nprobe, device=device)
    catalog = CatalogReplica(store.catalog, index, run)
    await catalog.try_load()
    app.state.catalog = catalog
    app.state.store = store

    async def follow() -> None:
        with contextlib.suppress(StoreUnavailable):
            await catalog.follow()

    follower = PeriodicLoop("catalog-follower", follow, settings.weights_poll_s)
    follower.start()
    learner = LearnerWorker(settings, store, index, StateLayout(dim), device)
    app.state.learner = learner
    await learner.start()
    log.info("learner %s started (%d items)", learner.consumer, len(index))
    try:
        yield
    finally:
        await learner.stop()
        await follower.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        await store.close()


# the learner's own port: operators' routes only
operations = APIRouter()


@operations.get("/healthz")
async def healthz():
    return {"status": "ok"}


@operations.get("/readyz")
async def readyz(request: Request):
    catalog: CatalogReplica | None = getattr(request.app.state, "catalog", None)
    if catalog is None or not catalog.loaded:
        raise APIError(503, "not_ready", "the catalog is not loaded", {"Retry-After": "1"})
    try:
        await request.app.state.store.ping()
    except StoreUnavailable as exc:
        raise APIError(503, "store_unavailable", "the store does not answer",
                       {"Retry-After": "2"}) from exc
    return {"status": "ready"}


@operations.get("/status")
async def status(request: Request):
    """With keys configured, an admin key is needed: the status names the lease's
    holder, which whoever can reach Redis could use to take it."""
    keyring: KeyRing = request.app.state.keyring
    if keyring.enabled:
        principal = keyring.identify(request.headers.get("x-api-key", ""))
        if principal is None:
            raise APIError(401, "unauthorized", "a valid X-API-Key header is required")
        if not principal.admin:
            raise APIError(403, "forbidden", "the learner's status needs an admin key")
    learner: LearnerWorker = request.app.state.learner
    return {"consumer": learner.consumer, "active": learner.active,
            "takeovers": learner.takeovers, "claimed": learner.claimed,
            "lease_holder": await request.app.state.store.registry.lease_holder(),
            **learner.stats()}


@operations.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.registry),
                    media_type=CONTENT_TYPE_LATEST)


def create_learner_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if not settings.redis_url:
        raise SystemExit("recsvc learner needs RECSVC_REDIS_URL: with the embedded store "
                         "the learner runs inside `recsvc serve`")
    # no interactive docs on the learner's port: it serves operators, not clients
    app = FastAPI(title="recsvc learner", lifespan=lambda app: _learner_running(app, settings),
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.state.keyring = KeyRing(settings.key_list, settings.admin_key_list)
    app.state.registry = new_registry()
    _metrics(app.state.registry, app)
    app.include_router(operations)
    return app
