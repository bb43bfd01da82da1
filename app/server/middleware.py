"""ASGI middleware: per-route latency metrics (the size limit is ``app.server.gate``'s)."""

from __future__ import annotations

import time

from app.metrics import Metrics


class MetricsMiddleware:
    """Latency histogram labelled by the route template (not the raw path)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], path, str(status)).observe(
                time.perf_counter() - start)
