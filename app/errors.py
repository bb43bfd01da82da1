"""The error body of API.md for every failure: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.schemas import error_field, first_error
from app.store import StoreUnavailable

log = logging.getLogger("recsvc.api")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
          503: "unavailable"}


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (numpy floats and large bodies without the stdlib cost)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, details: list | None = None,
                   headers: dict[str, str] | None = None) -> FastJSONResponse:
    body: dict = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return FastJSONResponse({"error": body}, status_code=status, headers=headers)


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the
    methods of the first route that matched the path (GET where DELETE exists too)."""
    methods: set[str] = set()

    def visit(routes) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # an included router
            if inner is not None:
                visit(inner.routes)
                continue
            match, _ = route.matches(request.scope)  # PARTIAL: the path, not the method
            if match != Match.NONE:
                methods.update(getattr(route, "methods", None) or ())

    visit(app.router.routes)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        details = [{"field": error_field(tuple(e.get("loc", ()))), "message": e.get("msg", ""),
                    "type": e.get("type", "")} for e in errors]
        return error_response(422, "validation_error", first_error(errors), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(_allowed(app, request))}
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"),
                              str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # API.md's error body even for a bug; the traceback goes to the log
        log.error("unhandled error: %r", exc, exc_info=exc)
        return error_response(500, "internal", "the service failed on this request")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable):
        return error_response(503, "store_unavailable",
                              "the store is unreachable; retry later, the event was not stored",
                              headers={"Retry-After": "2"})
