"""Python clients of the HTTP API, synchronous and asyncio (used by the CLI, the demo
and the benchmarks): every operation of ``docs/api.md``, retrying ``429`` and ``503``
after their ``Retry-After`` (tenacity).

    with Client("http://127.0.0.1:8000", api_key="...") as c:
        slate = c.recommend("u-1", "evening, on a phone", k=10)
        c.feedback(slate["request_id"], slate["items"][0]["item_id"], "click")

    async with AsyncClient(...) as c:
        slate = await c.recommend("u-1", k=10)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
)

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


# Both clients' retry policy: again while the answer is 429 or 503, RETRIES times at
# most, after its Retry-After; the last answer is returned whatever it is.
_RETRY_POLICY: dict[str, Any] = dict(
    retry=retry_if_result(lambda r: r.status_code in RETRIED), wait=_retry_after,
    stop=stop_after_attempt(RETRIES + 1), retry_error_callback=_last_answer, reraise=True)


def _retrying(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()`` under the retry policy."""
    return Retrying(**_RETRY_POLICY)(send)


def _key_header(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class ServiceError(RuntimeError):
    """The service refused a request: its method, path, status and error body."""

    def __init__(self, resp: httpx.Response) -> None:
        super().__init__(f"{resp.request.method} {resp.request.url.path} -> "
                         f"{resp.status_code}: {resp.text}")
        self.status = resp.status_code
        try:
            self.error: dict = resp.json().get("error", {})
        except ValueError:
            self.error = {}


@dataclass(frozen=True)
class Call:
    """One operation of the API, as both clients send it."""

    method: str
    path: str
    body: dict | None = None
    params: dict | None = None


def _answer(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        raise ServiceError(resp)
    return resp.json() if resp.content else {}


class Operations:
    """The API's operations (``docs/api.md``), each built as a ``Call``; ``Client`` and
    ``AsyncClient`` send them, so both have every operation under the same name."""

    @staticmethod
    def upsert(items: list[dict]) -> Call:
        return Call("POST", "/v1/items", {"items": items})

    @staticmethod
    def get_item(item_id: str) -> Call:
        return Call("GET", f"/v1/items/{quote(item_id, safe='')}")

    @staticmethod
    def delete_item(item_id: str) -> Call:
        return Call("DELETE", f"/v1/items/{quote(item_id, safe='')}")

    @staticmethod
    def list_items(limit: int = 100, cursor: str | None = None) -> Call:
        return Call("GET", "/v1/items", params={"limit": limit,
                                                **({"cursor": cursor} if cursor else {})})

    @staticmethod
    def similar(item_id: str, k: int = 10) -> Call:
        return Call("GET", f"/v1/items/{quote(item_id, safe='')}/similar", params={"k": k})

    @staticmethod
    def popular(k: int = 10) -> Call:
        return Call("GET", "/v1/popular", params={"k": k})

    @staticmethod
    def recommend(user_id: str, context: str | None = None, k: int = 10,
                  **extra: Any) -> Call:
        """``extra``: the request's other fields (``exclude``, ``explore``,
        ``defer_seen``...)."""
        body = {"user_id": user_id, "k": k, **extra}
        if context:
            body["context"] = {"text": context}
        return Call("POST", "/v1/recommend", body)

    @staticmethod
    def feedback(request_id: str, item_id: str, event: str = "click",
                 value: float | None = None) -> Call:
        return Call("POST", "/v1/feedback", {"request_id": request_id, "item_id": item_id,
                                             "event": event, "value": value})

    @staticmethod
    def feedback_batch(events: list[dict]) -> Call:
        return Call("POST", "/v1/feedback/batch", {"events": events})

    @staticmethod
    def seen(request_id: str, item_ids: list[str]) -> Call:
        return Call("POST", "/v1/seen", {"request_id": request_id, "item_ids": item_ids})

    @staticmethod
    def event(user_id: str, item_id: str, event: str, value: float | None = None) -> Call:
        return Call("POST", "/v1/events", {"user_id": user_id, "item_id": item_id,
                                           "event": event, "value": value})

    @staticmethod
    def user(user_id: str) -> Call:
        return Call("GET", f"/v1/users/{quote(user_id, safe='')}")

    @staticmethod
    def delete_user(user_id: str) -> Call:
        return Call("DELETE", f"/v1/users/{quote(user_id, safe='')}")

    @staticmethod
    def model() -> Call:
        return Call("GET", "/v1/model")

    @staticmethod
    def log(limit: int = 10_000) -> Call:
        """The evaluation log's newest closed impressions (admin key)."""
        return Call("GET", "/v1/log", params={"limit": limit})


class Client:
    """Synchronous client: every ``Operations`` method, sent and answered (a ``dict``,
    or ``ServiceError`` for a 4xx/5xx). A ``429`` or ``503`` (a rate limit, a store
    outage: a pause, not a failure) is retried after its ``Retry-After``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, http: httpx.Client | None = None) -> None:
        self.http = http or httpx.Client(base_url=url, headers=_key_header(api_key),
                                         timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: Call) -> dict:
        return _answer(_retrying(lambda: self.http.request(
            call.method, call.path, json=call.body, params=call.params)))

    # -- the operations (Operations' docstrings) --
    def upsert(self, items: list[dict]) -> dict:
        return self.send(Operations.upsert(items))

    def get_item(self, item_id: str) -> dict:
        return self.send(Operations.get_item(item_id))

    def delete_item(self, item_id: str) -> dict:
        return self.send(Operations.delete_item(item_id))

    def list_items(self, limit: int = 100, cursor: str | None = None) -> dict:
        return self.send(Operations.list_items(limit, cursor))

    def similar(self, item_id: str, k: int = 10) -> dict:
        return self.send(Operations.similar(item_id, k))

    def popular(self, k: int = 10) -> dict:
        return self.send(Operations.popular(k))

    def recommend(self, user_id: str, context: str | None = None, k: int = 10,
                  **extra: Any) -> dict:
        return self.send(Operations.recommend(user_id, context, k, **extra))

    def feedback(self, request_id: str, item_id: str, event: str = "click",
                 value: float | None = None) -> dict:
        return self.send(Operations.feedback(request_id, item_id, event, value))

    def feedback_batch(self, events: list[dict]) -> dict:
        return self.send(Operations.feedback_batch(events))

    def seen(self, request_id: str, item_ids: list[str]) -> dict:
        return self.send(Operations.seen(request_id, item_ids))

    def event(self, user_id: str, item_id: str, event: str, value: float | None = None) -> dict:
        return self.send(Operations.event(user_id, item_id, event, value))

    def user(self, user_id: str) -> dict:
        return self.send(Operations.user(user_id))

    def delete_user(self, user_id: str) -> dict:
        return self.send(Operations.delete_user(user_id))

    def model(self) -> dict:
        return self.send(Operations.model())

    def log(self, limit: int = 10_000) -> dict:
        return self.send(Operations.log(limit))

    def iter_items(self, page: int = 100) -> Iterator[dict]:
        """Every item of the catalog, a page at a time."""
        cursor = None
        while True:
            got = self.send(Operations.list_items(page, cursor))
            yield from got["items"]
            cursor = got["next_cursor"]
            if cursor is None:
                return


class AsyncClient:
    """``Client`` for asyncio: the same operations, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, http: httpx.AsyncClient | None = None) -> None:
        self.http = http or httpx.AsyncClient(base_url=url, headers=_key_header(api_key),
                                              timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: Call) -> dict:
        async def attempt() -> httpx.Response:
            return await self.http.request(call.method, call.path, json=call.body,
                                           params=call.params)

        resp: httpx.Response = await AsyncRetrying(**_RETRY_POLICY)(attempt)
        return _answer(resp)

    # -- the operations (Operations' docstrings) --
    async def upsert(self, items: list[dict]) -> dict:
        return await self.send(Operations.upsert(items))

    async def get_item(self, item_id: str) -> dict:
        return await self.send(Operations.get_item(item_id))

    async def delete_item(self, item_id: str) -> dict:
        return await self.send(Operations.delete_item(item_id))

    async def list_items(self, limit: int = 100, cursor: str | None = None) -> dict:
        return await self.send(Operations.list_items(limit, cursor))

    async def similar(self, item_id: str, k: int = 10) -> dict:
        return await self.send(Operations.similar(item_id, k))

    async def popular(self, k: int = 10) -> dict:
        return await self.send(Operations.popular(k))

    async def recommend(self, user_id: str, context: str | None = None, k: int = 10,
                        **extra: Any) -> dict:
        return await self.send(Operations.recommend(user_id, context, k, **extra))

    async def feedback(self, request_id: str, item_id: str, event: str = "click",
                       value: float | None = None) -> dict:
        return await self.send(Operations.feedback(request_id, item_id, event, value))

    async def feedback_batch(self, events: list[dict]) -> dict:
        return await self.send(Operations.feedback_batch(events))

    async def seen(self, request_id: str, item_ids: list[str]) -> dict:
        return await self.send(Operations.seen(request_id, item_ids))

    async def event(self, user_id: str, item_id: str, event: str,
                    value: float | None = None) -> dict:
        return await self.send(Operations.event(user_id, item_id, event, value))

    async def user(self, user_id: str) -> dict:
        return await self.send(Operations.user(user_id))

    async def delete_user(self, user_id: str) -> dict:
        return await self.send(Operations.delete_user(user_id))

    async def model(self) -> dict:
        return await self.send(Operations.model())

    async def log(self, limit: int = 10_000) -> dict:
        return await self.send(Operations.log(limit))

    async def iter_items(self, page: int = 100) -> AsyncIterator[dict]:
        cursor = None
        while True:
            got = await self.send(Operations.list_items(page, cursor))
            for item in got["items"]:
                yield item
            cursor = got["next_cursor"]
            if cursor is None:
                return


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
