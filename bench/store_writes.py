"""The store's share of a recommendation and of a feedback event: client CPU and wall
time per call of ``log_impressions`` (the impression ``POST /v1/recommend`` writes)
and of ``feedback_on_slates`` (``POST /v1/feedback``'s), each batched as the service
batches concurrent requests, on a private Redis, with no web stack around them.

Under ``wrk`` the service's throughput swings by more than many changes to the store
move it (the machine's speed drifts between runs); this call alone, repeated, does
not. To compare two commits, run it at each in turn, interleaved.

    python -m bench.store_writes [--slates 3200] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import numpy as np

from app.store import Impression
from app.store.base import FeedbackEvent
from app.store.redis_store import RedisStore
from app.tools.processes import private_redis
from bench.load import wait_redis

STATE_FLOATS = 1157  # a state of the default encoder's width, as an impression stores it


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_call(start: tuple[float, float], n: int) -> tuple[float, float]:
    """(wall us, client CPU us) per call since ``start``."""
    wall, cpu = _clock()
    return 1e6 * (wall - start[0]) / n, 1e6 * (cpu - start[1]) / n


async def measure(url: str, slates: int, batch: int,
                  prefix: str) -> dict[str, tuple[float, float]]:
    """Log ``slates`` impressions of 10 items, then one click on each, both in batches
    of ``batch``: (wall us, client CPU us) per impression and per accepted event."""
    store = RedisStore(url, prefix)
    now = time.time()
    state = np.ones(STATE_FLOATS, np.float32).tobytes()
    imps = [Impression(f"r{i}", f"u{i % 500}", now, 1, state, [f"i{j}" for j in range(10)],
                       [0.1] * 10, [False] * 10) for i in range(slates)]
    start = _clock()
    for k in range(0, slates, batch):
        await store.impressions.log_impressions(imps[k:k + batch], 3600, 100)
    out = {"impression": _per_call(start, slates)}
    events = [FeedbackEvent(f"r{i}", f"i{i % 10}", "click", None, 1.0, now)
              for i in range(slates)]
    start = _clock()
    for k in range(0, slates, batch):
        answers = await store.impressions.feedback_on_slates(events[k:k + batch], 3600, 100)
        if any(a.status != "accepted" for a in answers):
            raise RuntimeError(f"feedback refused: {answers}")
    out["feedback"] = _per_call(start, slates)
    await store.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slates", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=16, help="events per store call")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir, private_redis(workdir) as url:
        wait_redis(url)
        for n in range(args.repeat):
            for what, (wall, cpu) in asyncio.run(
                    measure(url, args.slates, args.batch, f"w{n}")).items():
                print(f"run {n + 1}: {what:10s} {wall:6.1f} us wall, {cpu:6.1f} us client "
                      f"CPU per call ({args.slates} in batches of {args.batch})", flush=True)


if __name__ == "__main__":
    main()
