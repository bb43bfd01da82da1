"""Dependencies shared by the routers: the engine, and the admin requirement.

They are ``async def`` (here and in ``app.auth``): FastAPI runs a plain ``def``
dependency on a worker thread, a thread hop per request for a few attribute reads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth import require_admin
from app.errors import APIError
from app.schemas import ErrorOut
from app.server.engine import Engine


async def ready_engine(request: Request) -> Engine:
    """The engine, once it can serve; a 503 with ``Retry-After`` while it starts."""
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise APIError(503, "not_ready", "the service is starting", {"Retry-After": "1"})
    return engine


# the contract's version prefix; routers carry it themselves, so a route's template
# (the ``route`` label of the latency metric) is the whole path
V1 = "/v1"
EngineDep = Annotated[Engine, Depends(ready_engine)]
ADMIN = [Depends(require_admin)]
ADMIN_ERRORS: dict[int | str, dict] = {
    403: {"model": ErrorOut, "description": "the key is not an admin key"}}
