"""A small synchronous client for the HTTP API (used by the CLI, demo and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

# answers that say "not now": retried after their Retry-After, this many times
RETRIED = (429, 503)
RETRIES = 5
RETRY_AFTER_MAX_S = 30.0


class ServiceError(RuntimeError):
    """The service refused a request: its method, path, status and error body."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _ok(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise ServiceError(f"{resp.request.method} {resp.request.url.path} -> "
                               f"{resp.status_code}: {resp.text}")
        return resp.json() if resp.content else {}

    def _post(self, path: str, body: dict) -> httpx.Response:
        """POST, waiting out a ``429`` or ``503`` for as long as its ``Retry-After``
        says (at most ``RETRY_AFTER_MAX_S`` a time, ``RETRIES`` times): a rate limit or
        a store outage is a pause, not a failure, for a bulk load."""
        for attempt in range(RETRIES + 1):
            resp = self.http.post(path, json=body)
            if resp.status_code not in RETRIED or attempt == RETRIES:
                return resp
            try:
                wait = float(resp.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.0), RETRY_AFTER_MAX_S))
        return resp

    def upsert(self, items: list[dict]) -> dict:
        return self._ok(self._post("/v1/items", {"items": items}))

    def recommend(self, user_id: str, context: str | None = None, k: int = 10,
                  **extra) -> dict:
        body = {"user_id": user_id, "k": k, **extra}
        if context:
            body["context"] = {"text": context}
        return self._ok(self._post("/v1/recommend", body))

    def feedback(self, request_id: str, item_id: str, event: str = "click",
                 value: float | None = None) -> dict:
        return self._ok(self._post("/v1/feedback", {
            "request_id": request_id, "item_id": item_id, "event": event, "value": value}))

    def model(self) -> dict:
        return self._ok(self.http.get("/v1/model"))


def wait_ready(url: str, alive: Callable[[], bool], timeout_s: float = 90.0) -> bool:
    """Poll ``url/readyz`` until it answers 200. False as soon as ``alive()`` turns
    false (the server process died) or when ``timeout_s`` runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and alive():
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
