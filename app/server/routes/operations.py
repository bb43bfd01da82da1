"""Operations routes, outside ``/v1`` and without a key: health, readiness, metrics,
and the offline API docs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import APIError
from app.schemas import ErrorOut
from app.server.engine import Engine
from app.store import StoreUnavailable

# where Swagger UI's assets are served (``app.server.api`` mounts the package's copy there)
DOCS_ASSETS = "/docs-assets"
# the dashboard page and its assets, vendored in the package (the service runs offline)
DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
DASHBOARD_ASSETS = "/dashboard-assets"

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="recsvc API",
                               swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    """The live dashboard: a static page that reads ``/metrics``, ``/v1/model`` and
    ``/v1/log`` with the key typed into it, so it needs no key to load."""
    return FileResponse(DASHBOARD_DIR / "index.html")


@router.get("/healthz", include_in_schema=True)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorOut}})
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
    request.app.state.metrics.store_up.set(1 if store == "ok" else 0)
    body = {"status": "ready", "catalog_size": len(engine.index), "store": store}
    if detail:
        body["store_detail"] = detail
    return body


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
