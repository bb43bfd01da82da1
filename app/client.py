"""A small synchronous client for the HTTP API (used by the CLI, demo and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _ok(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise RuntimeError(f"{resp.request.method} {resp.request.url.path} -> "
                               f"{resp.status_code}: {resp.text}")
        return resp.json() if resp.content else {}

    def upsert(self, items: list[dict]) -> dict:
        return self._ok(self.http.post("/v1/items", json={"items": items}))

    def recommend(self, user_id: str, context: str | None = None, k: int = 10,
                  **extra) -> dict:
        body = {"user_id": user_id, "k": k, **extra}
        if context:
            body["context"] = {"text": context}
        return self._ok(self.http.post("/v1/recommend", json=body))

    def feedback(self, request_id: str, item_id: str, event: str = "click",
                 value: float | None = None) -> dict:
        return self._ok(self.http.post("/v1/feedback", json={
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
