"""API keys, the admin role and the per-key rate limit, as FastAPI dependencies.

Keys are kept only as SHA-256 digests. A presented key is hashed and compared
with every known digest by ``hmac.compare_digest``, so neither the key's length
nor which key matched shows in the timing. Logs and rate-limit counters name a
key by a short digest prefix (``key_id``), never by the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from app.errors import APIError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key (by digest prefix) or, with auth off, a client address."""

    key_id: str
    admin: bool


class KeyRing:
    """The configured keys. With no key at all, auth is off and everyone is admin
    (the development default); once any key is set, roles apply."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]) -> None:
        admin = {_digest(k) for k in admin_keys}
        self._digests = [(d, d in admin) for d in {_digest(k) for k in api_keys} | admin]
        self.enabled = bool(self._digests)
        self.has_admin = bool(admin)

    def identify(self, given: str) -> Principal | None:
        digest = _digest(given)
        found: bytes | None = None
        admin = False
        for known, is_admin in self._digests:  # no early exit: constant work per key
            if hmac.compare_digest(digest, known):
                found, admin = known, is_admin
        return Principal(found.hex()[:12], admin) if found is not None else None


# Declared so that the OpenAPI document has the scheme and Swagger UI an Authorize
# button; the key itself is checked by the request gate, before the body is read.
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                       description="an API key (RECSVC_API_KEYS) or an admin key "
                                   "(RECSVC_ADMIN_KEYS); none while the service has no keys")


async def authenticate(request: Request,
                       _key: Annotated[str | None, Security(API_KEY)] = None) -> Principal:
    """Every ``/v1`` route: who is calling, as the request gate (``app.server.gate``) found from
    the headers before the body was read (it answered ``401`` already otherwise)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise APIError(401, "unauthorized", "a valid X-API-Key header is required")
    return principal


async def require_admin(request: Request) -> None:
    """Catalog writes, user erasure, the evaluation log and model operations:
    ``403`` for a valid key that is not an admin key."""
    principal: Principal = request.state.principal
    if not principal.admin:
        ring: KeyRing = request.app.state.keyring
        hint = "" if ring.has_admin else " (no RECSVC_ADMIN_KEYS are configured)"
        raise APIError(403, "forbidden", f"this operation needs an admin key{hint}")
