"""ASGI middleware: the request id, per-route latency metrics and the access log (the
size limit is ``app.server.gate``'s)."""

from __future__ import annotations

import logging
import time

from app.logs import incoming_request_id, request_id
from app.metrics import Metrics

access = logging.getLogger("recsvc.access")
# probes and scrapes come every few seconds: their lines are DEBUG, not INFO
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class MetricsMiddleware:
    """Outermost: gives each request its id (``X-Request-ID`` in and out, and on every
    log line of the request), times it into the latency histogram labelled by the
    route template (not the raw path), and writes its access log line."""

    def __init__(self, app, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        header = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = incoming_request_id(header)
        token = request_id.set(rid)

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], path, str(status)).observe(elapsed)
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            if self.access_log and access.isEnabledFor(level):
                client = scope.get("client")
                access.log(level, "%s %s %d %.1f ms", scope["method"], scope["path"],
                           status, elapsed * 1000, extra={
                               "method": scope["method"], "route": path,
                               "path": scope["path"], "status": status,
                               "duration_ms": round(elapsed * 1000, 3),
                               "client": client[0] if client else None})
            request_id.reset(token)
