"""Micro-batching: concurrent callers share one call of a batched blocking function.

Requests that arrive while a batch is being computed wait and go together into
the next call, so under load the transformer runs one forward pass for many
requests instead of one each, and never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextvars import Context
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], executor: Executor,
                 max_batch: int = 64, concurrency: int = 1) -> None:
        """``concurrency`` batches may compute at once (one per core the work can use:
        the GIL is released inside numpy, torch and FAISS)."""
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._queue: list[tuple[In, asyncio.Future]] = []
        self._running = 0

    async def submit(self, value: In) -> Out:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((value, fut))
        if self._running < self.concurrency:
            self._running += 1
            # a fresh context: not the request id of whichever request started it
            asyncio.get_running_loop().create_task(self._drain(), context=Context())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await _send_queued(self._queue, self.max_batch, lambda values: loop.run_in_executor(
                self.executor, self.fn, values))
        finally:
            self._running -= 1


class StoreBatcher(Generic[In, Out]):
    """Concurrent requests' calls to the store go out together, one pipeline per batch.

    Under load most of a Redis call's cost is the client's per-call work (pool,
    timeout, retry, framing), not the commands: ``submit`` queues its value, and
    while one batch is in flight the next callers wait and go together into the
    next call of ``fn`` (an ``async`` function of a list, answering in order). One
    caller alone goes at once, after one turn of the event loop. A failure of the
    batch's call is every waiter's failure.
    """

    def __init__(self, fn: Callable[[list[In]], Awaitable[Sequence[Out]]],
                 max_batch: int = 64) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self._queue: list[tuple[In, asyncio.Future]] = []
        self._running = False

    async def submit(self, value: In) -> Out:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((value, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain(), context=Context())
        return await fut

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # callers of this same turn of the loop join the batch
            await _send_queued(self._queue, self.max_batch, self.fn)
        finally:
            self._running = False


async def _send_queued(queue: list[tuple[In, asyncio.Future]], max_batch: int,
                       call: Callable[[list[In]], Awaitable[Sequence[Out]]]) -> None:
    """Send the queued values through ``call`` in batches of at most ``max_batch``
    until the queue is empty (callers may add to it meanwhile), and give each waiter
    its result, or the batch's failure: every waiter of a failed batch sees it."""
    while queue:
        batch = queue[:max_batch]
        del queue[:max_batch]
        try:
            results = await call([v for v, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            continue
        for (_, fut), res in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(res)
