"""The store's share of a feedback event: client CPU and wall time per event of
``feedback_on_slates`` (the call ``POST /v1/feedback`` makes, batched as the service
batches concurrent events), on a private Redis, with no web stack around it.

Under ``wrk`` the service's throughput swings by more than many changes to the store
move it (the machine's speed drifts between runs); this call alone, repeated, does
not. To compare two commits, run it at each in turn, interleaved.

    python -m bench.feedback_store [--slates 3200] [--batch 16] [--repeat 3]
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


async def measure(url: str, slates: int, batch: int, prefix: str) -> tuple[float, float]:
    """Log ``slates`` impressions of 10 items, then one click on each in batches of
    ``batch``: (wall us, client CPU us) per accepted event."""
    store = RedisStore(url, prefix)
    now = time.time()
    state = np.ones(STATE_FLOATS, np.float32).tobytes()
    imps = [Impression(f"r{i}", f"u{i % 500}", now, 1, state, [f"i{j}" for j in range(10)],
                       [0.1] * 10, [False] * 10) for i in range(slates)]
    for k in range(0, slates, 100):
        await store.impressions.log_impressions(imps[k:k + 100], 3600, 100)
    events = [FeedbackEvent(f"r{i}", f"i{i % 10}", "click", None, 1.0, now)
              for i in range(slates)]
    wall, cpu = time.perf_counter(), time.process_time()
    for k in range(0, slates, batch):
        out = await store.impressions.feedback_on_slates(events[k:k + batch], 3600, 100)
        if any(o.status != "accepted" for o in out):
            raise RuntimeError(f"feedback refused: {out}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await store.close()
    return 1e6 * wall / slates, 1e6 * cpu / slates


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
            wall, cpu = asyncio.run(measure(url, args.slates, args.batch, f"fb{n}"))
            print(f"run {n + 1}: {wall:6.1f} us wall, {cpu:6.1f} us client CPU per event "
                  f"({args.slates} events in batches of {args.batch})", flush=True)


if __name__ == "__main__":
    main()
