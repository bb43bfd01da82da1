"""Background loops that stop between iterations, not in the middle of one.

Cancelling a task while it waits on a Redis reply can leave the client's
connection mid-protocol (and, seen here, hang shutdown). A ``PeriodicLoop``
instead finishes its current iteration, then exits; cancellation is only the
fallback when an iteration overruns the stop timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("recsvc.loops")


class PeriodicLoop:
    def __init__(self, name: str, body: Callable[[], Awaitable[None]], interval_s: float,
                 ) -> None:
        self.name = name
        self.body = body
        self.interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.body()
            except Exception:
                log.exception("%s: iteration failed", self.name)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; cancelling", self.name, timeout_s)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
