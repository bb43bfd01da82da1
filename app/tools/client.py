"""A small synchronous client for the HTTP API (used by the CLI, demo and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt

# answers that say "not now": retried after their Retry-After, this many times
RETRIED = (429, 503)
RETRIES = 5
RETRY_AFTER_MAX_S = 30.0


def _retry_after(state: RetryCallState) -> float:
    """The answer's ``Retry-After`` (seconds), else exponential backoff from 0.5 s;
    never more than ``RETRY_AFTER_MAX_S``."""
    backoff = min(0.5 * 2 ** (state.attempt_number - 1), RETRY_AFTER_MAX_S)
    resp = state.outcome.result() if state.outcome and not state.outcome.failed else None
    header = resp.headers.get("retry-after") if resp is not None else None
    try:
        wait = float(header) if header is not None else backoff
    except ValueError:  # an HTTP date: not sent by recsvc, backoff instead
        wait = backoff
    return min(max(wait, 0.0), RETRY_AFTER_MAX_S)


def _last_answer(state: RetryCallState) -> httpx.Response:
    """The answer of the last attempt, once retries are spent."""
    assert state.outcome is not None  # the callback runs after an attempt
    return state.outcome.result()


def _retrying(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()`` again while it answers ``429`` or ``503``, ``RETRIES`` times at most;
    the last answer is returned whatever it is."""
    return Retrying(retry=retry_if_result(lambda r: r.status_code in RETRIED),
                    wait=_retry_after, stop=stop_after_attempt(RETRIES + 1),
                    retry_error_callback=_last_answer,
                    reraise=True)(send)


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
        """POST, waiting out a ``429`` or ``503`` (a rate limit, a store outage: a pause,
        not a failure, for a bulk load) as ``_retrying`` says."""
        return _retrying(lambda: self.http.post(path, json=body))

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
