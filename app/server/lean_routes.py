"""The two routes every client calls per event, without FastAPI's per-request work.

``POST /v1/recommend`` and ``POST /v1/feedback`` are most of the traffic. In the
profile of feedback under load, FastAPI's routing, dependency solving and body
handling took about a third of the event loop: more than the store's I/O. A
``LeanRoute`` answers such a request itself when it is the common case, and hands
every other request to FastAPI's own route, so the contract is FastAPI's wherever
this path does not go:

- the common case: ``POST``, a JSON content type, a body that parses and validates as
  the route's model (the same pydantic model, the same Python-mode validation that
  FastAPI applies to the parsed JSON), the request gate found a principal (the key
  is valid, or auth is off) and the engine is ready;
- its answer is what the route's endpoint returns (the same function is called);
  an ``APIError`` or ``StoreUnavailable`` it raises reaches the app's exception
  handlers as it does from FastAPI's route;
- anything else (invalid JSON, a validation error, no key, not ready, a request
  FastAPI would answer with a model rather than a ``Response``) goes to FastAPI's
  routing with the body it already read replayed, so 401, 422 and 503 bodies are
  FastAPI's and the error handlers' exactly.

Every middleware (request ids, metrics, access log, the gate's key, size and rate
checks) runs around both paths alike: a ``LeanRoute`` is a route, inside them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import URLPath
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Message, Receive, Scope, Send

from app.server.engine import Engine

# set in a request's scope once its LeanRoute declined it: FastAPI's routing then runs
# again from the top, and the LeanRoute must not match the same request twice
DECLINED = "recsvc.lean_declined"

# the endpoint's answer to a validated body, or None where FastAPI must render it
Answer = Callable[[BaseModel, Engine], Awaitable[Response | None]]


def _json_content_type(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The request's body, and the message that cut it short (a disconnect), if any."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, cut: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` again (and the message that cut it short),
    then whatever ``receive`` gives."""
    pending: list[Message] = [{"type": "http.request", "body": body,
                               "more_body": cut is not None}]
    if cut is not None:
        pending.append(cut)

    async def receive_again() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return receive_again


class LeanRoute(BaseRoute):
    """``POST path`` answered by ``answer`` in the common case (module docstring);
    everything else, and every other method, by FastAPI's ``route``."""

    def __init__(self, app: FastAPI, route: APIRoute, model: type[BaseModel],
                 answer: Answer) -> None:
        self.app = app
        self.route = route
        self.path = route.path
        self.path_format = route.path_format  # FastAPI's telemetry names routes by it
        self.model = model
        self.answer = answer

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # (behind a proxy's root path FastAPI's routes answer everything: correct, slower)
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == self.path and not scope.get("root_path")
                and DECLINED not in scope):
            # what FastAPI's own match puts in the scope that matters downstream: the
            # route (the latency metric's label is its path template), its endpoint
            return Match.FULL, {"route": self.route, "endpoint": self.route.endpoint,
                                "path_params": {}}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        # FastAPI's route of the same path has the name: url_for finds it there
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _json_content_type(scope):
            body, cut = await _read_body(receive)
            response = await self._answer(scope, body) if cut is None else None
            if response is not None:
                await response(scope, receive, send)
                return
            receive = _replay(body, cut, receive)
        scope[DECLINED] = True
        await self.app.router.app(scope, receive, send)

    async def _answer(self, scope: Scope, body: bytes) -> Response | None:
        engine: Engine | None = getattr(self.app.state, "engine", None)
        if (engine is None or not engine.ready or self.app.dependency_overrides
                or scope.get("state", {}).get("principal") is None):
            # (with overridden dependencies, tests' usually, FastAPI's routes answer)
            return None
        try:
            parsed = self.model.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError):
            return None
        return await self.answer(parsed, engine)


def install_lean_routes(app: FastAPI, routes: list[tuple[APIRoute, type[BaseModel], Answer]],
                        ) -> None:
    """Put a ``LeanRoute`` before FastAPI's routes for each ``(route, the body's model,
    the endpoint's answer)``, ``route`` being the ``APIRoute`` of its router (the one
    FastAPI's routing puts in the scope). Call after the routers were included."""
    for route, model, answer in routes:
        app.router.routes.insert(0, LeanRoute(app, route, model, answer))
    mark_changed = getattr(app.router, "_mark_routes_changed", None)  # FastAPI >= 0.16x
    if mark_changed is not None:
        mark_changed()  # FastAPI's caches of the routes see them
