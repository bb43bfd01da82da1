"""The request gate: who may send a body, how large, how often, before it is read.

An ASGI middleware in front of the application. For ``/v1`` (and the API docs when
keys are set) it authenticates from the headers, refuses a body over the route's
limit by its Content-Length, applies the rate limit, and only then reads the body,
counting it, so an unauthenticated client cannot make the service read, parse or
hold a large body, and a chunked body over the limit gets ``413`` like any other
(FastAPI's body reading turned the limit's exception into a ``400``). The body is
handed to the application already read, so what the route parses is what was
counted. Catalog writes (``POST /v1/items``) may send ``RECSVC_MAX_BODY_BYTES``, every
other route ``RECSVC_MAX_REQUEST_BYTES``; a catalog write with a key that is not an
admin key is refused before its body is read too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time

import orjson

from app.auth import KeyRing, Principal
from app.metrics import Metrics
from app.settings import Settings
from app.store import StoreUnavailable
from app.store.base import RateLimits

DOCS = ("/docs", "/openapi.json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    body = orjson.dumps({"error": {"code": code, "message": message}})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, \
        {"type": "http.response.body", "body": body}


class RequestGate:
    def __init__(self, app, settings: Settings, keyring: KeyRing, metrics: Metrics,
                 limits=lambda: None) -> None:
        """``limits()`` gives the store's rate limits once the application has started
        (None before)."""
        self.app = app
        self.settings = settings
        self.keyring = keyring
        self.metrics = metrics
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        guarded = path.startswith("/v1/") or (self.keyring.enabled and path in DOCS)
        principal = None
        if guarded:
            principal = self._principal(scope)
            if principal is None:
                return await _send(send, _error(401, "unauthorized",
                                                "a valid X-API-Key header is required"))
        catalog = method == "POST" and path == "/v1/items"
        if catalog and principal is not None and not principal.admin:
            hint = "" if self.keyring.has_admin else " (no RECSVC_ADMIN_KEYS are configured)"
            return await _send(send, _error(403, "forbidden",
                                            f"this operation needs an admin key{hint}"))
        limit = self.settings.max_body_bytes if catalog else self.settings.max_request_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _send(send, _too_large(limit))
        if guarded and path.startswith("/v1/"):
            refused = await self._rate_limited(principal)
            if refused is not None:
                return await _send(send, refused)
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
        if not guarded or method not in ("POST", "PUT", "PATCH", "DELETE"):
            # no route outside /v1 takes a body: the application answers without reading
            return await self.app(scope, receive, send)
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        return await _send(send, _too_large(limit))
        except TimeoutError:
            return await _send(send, _error(
                408, "request_timeout", f"the request body did not arrive within "
                f"{self.settings.body_timeout_s:g} s", {"Connection": "close"}))
        body = bytes(body)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _principal(self, scope) -> Principal | None:
        if not self.keyring.enabled:
            return Principal(f"ip:{self._client(scope)}", True)
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                return self.keyring.identify(value.decode("latin-1"))
        return None

    def _client(self, scope) -> str:
        """The client's address: the peer's, or behind a trusted proxy the last address
        of X-Forwarded-For that is not a trusted proxy (what the proxies saw)."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        networks = self.settings.proxy_networks
        if not networks or not _within(peer, networks):
            return peer
        # every X-Forwarded-For line in order (a proxy may add a line of its own after
        # the client's): the hops a proxy appended are the last ones
        hops = [h.strip() for name, value in scope.get("headers", [])
                if name == b"x-forwarded-for"
                for h in value.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not _within(hop, networks):
                return hop
        return peer

    async def _rate_limited(self, principal: Principal):
        """``429`` with ``Retry-After`` once a key made ``RECSVC_RATE_LIMIT`` requests in
        the current window. Counted in the store, so with Redis every replica shares
        the count. If the store is unavailable the request is let through: an outage
        must not turn into refusing every recommendation."""
        s = self.settings
        limits: RateLimits | None = self.limits()
        if s.rate_limit <= 0 or limits is None:
            return None
        window = s.rate_limit_window_s
        now = time.time()
        start = math.floor(now / window) * window
        try:
            count = await limits.count_request(principal.key_id, int(start), window)
        except StoreUnavailable:
            return None
        if count <= s.rate_limit:
            return None
        self.metrics.rate_limited.inc()
        retry = max(1, math.ceil(start + window - now))
        return _error(429, "rate_limited",
                      f"more than {s.rate_limit} requests in {window} s for this key",
                      {"Retry-After": str(retry)})


def _within(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int):
    return _error(413, "payload_too_large", f"request body exceeds {limit} bytes")


async def _send(send, messages) -> None:
    for message in messages:
        await send(message)
