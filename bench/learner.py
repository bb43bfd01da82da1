"""The learner in the production topology: throughput, propagation lag, takeover time.

1. Throughput: a private Redis is filled with logged slates (impressions) and clicks
   on them, as API replicas write them; one learner (the real ``LearnerWorker``,
   holding the lease, default settings) then drains the stream. Reported: stream
   entries, feedback events and transitions learned per second, wall clock from the
   first read to the last commit. The target is 2,000 transitions/s, about a
   managed service's published ceiling of 2,000 events/s.
2. Lag: one API replica (RECSVC_ROLE=api) and one ``recsvc learner`` process on a
   private Redis, default settings. For each click: the time from its 202 to the
   first slate the replica serves with a weights version that holds it (the store's
   counters say which version first holds it; commits are atomic).
3. Takeover: two learners; the lease holder is SIGKILLed; the time until the
   standby reports that it holds the lease (default RECSVC_LEASE_TTL_S = 5 s).

  python -m bench.learner [--slates 20000] [--items 10000] [--lag-samples 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

import httpx
import numpy as np
from tqdm import tqdm

from app.learner.worker import LearnerWorker
from app.settings import Settings
from app.store import Impression, ItemRecord
from app.store.redis_store import RedisStore
from app.tools.processes import private_redis, running_service_process
from models.ann import set_search_threads
from models.index import CandidateIndex
from models.state import N_ITEM_FEATURES, StateLayout

DIM = 384
SLATE = 10


def percentiles(values: list[float]) -> str:
    a = np.asarray(values)
    return (f"p50 {np.percentile(a, 50):.2f} s, p90 {np.percentile(a, 90):.2f} s, "
            f"max {a.max():.2f} s (n={len(a)})")


# -- 1. throughput -------------------------------------------------------------------
async def _fill(store: RedisStore, slates: int, items: list[str], users: int,
                click_rate: float, rng: np.random.Generator) -> int:
    """Write slates and clicks as API replicas would; returns the clicks written."""
    layout = StateLayout(DIM)
    clicks = 0
    now = time.time() - 3600  # every reward window is closed by the time the learner reads
    slates_batch, clicks_batch = [], []
    for n in tqdm(range(slates), desc="writing slates and clicks", unit="slate"):
        state = rng.standard_normal(layout.size).astype(np.float32)
        chosen = [items[i] for i in rng.choice(len(items), SLATE, replace=False)]
        imp = Impression(f"r{n}", f"u{n % users}", now + n * 1e-3, 0, state.tobytes(), chosen,
                         [0.9] * SLATE, [False] * SLATE,
                         rng.random((SLATE, N_ITEM_FEATURES)).round(3).tolist(), 200)
        slates_batch.append(store.impressions.log_impression(imp, 86_400, 200))
        for item in chosen:
            if rng.random() < click_rate:
                clicks_batch.append(store.impressions.record_feedback(
                    imp.request_id, imp.user_id, item, "click", None, 1.0, imp.ts + 1,
                    86_400, 50))
                clicks += 1
        if len(slates_batch) >= 200 or n == slates - 1:
            # as in production, a click comes after its slate was logged
            await asyncio.gather(*slates_batch)
            await asyncio.gather(*clicks_batch)
            slates_batch, clicks_batch = [], []
    return clicks


async def throughput(args: argparse.Namespace, redis_url: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    store = RedisStore(redis_url, "bench-learner")
    vectors = rng.standard_normal((args.items, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [f"i{n}" for n in range(args.items)]
    await store.catalog.put_items([ItemRecord(i, i, [], True, v.tobytes(), i)
                                   for i, v in zip(items, vectors, strict=True)])
    set_search_threads(Settings().search_threads)  # as `recsvc learner` does
    index = CandidateIndex(DIM)
    index.upsert(items, vectors)
    clicks = await _fill(store, args.slates, items, args.users, args.click_rate, rng)
    entries = args.slates + clicks
    # a short window so that slates close as they are read; everything else default
    settings = Settings(redis_url=redis_url, key_prefix="bench-learner", reward_wait_s=0.0,
                        replay_prefault=False, learner_read_count=args.read_count)
    worker = LearnerWorker(settings, store, index, StateLayout(DIM), "cpu")
    # every slot of every slate becomes one transition: a click's at once, the others'
    # when the slate's window closes
    total = args.slates * SLATE
    bar = tqdm(total=total, desc="learning", unit="transition")
    start = time.perf_counter()
    await worker.start()  # the real loop: takes the lease, reads, learns, commits
    while worker.transitions < total or worker.pending or worker._dirty:
        await asyncio.sleep(0.05)
        bar.update(worker.transitions - bar.n)
    elapsed = time.perf_counter() - start
    bar.close()
    stats = await store.registry.get_stats()
    await worker.stop()
    await store.close()
    return {"entries": entries, "clicks": clicks, "transitions": worker.transitions,
            "feedback_learned": stats["feedback_learned"], "seconds": elapsed,
            "updates": worker.learner.updates}


# -- 2. lag ------------------------------------------------------------------------
MOVIES = [f"Film {n}. " + g for n, g in enumerate(
    ["Drama", "Comedy", "Action, Thriller", "Animation, Children's", "Romance", "Horror",
     "Documentary", "Sci-Fi, Adventure", "Crime, Drama", "Musical"] * 3)]


async def _store_version_holding(store: RedisStore, learned: int, timeout: float) -> int:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        stats = await store.registry.get_stats()
        if stats.get("feedback_learned", 0) >= learned:
            return int(stats["version"])
        await asyncio.sleep(0.005)
    raise TimeoutError(f"feedback event {learned} was not learned within {timeout} s")


def lag(args: argparse.Namespace, redis_url: str) -> list[float]:
    env = {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": "bench-lag",
           "RECSVC_REPLAY_PREFAULT": "false"}
    rng = np.random.default_rng(1)
    lags = []
    with running_service_process({**env, "RECSVC_ROLE": "api"}) as (api, _), \
            running_service_process(env, command="learner") as _:
        c = httpx.Client(base_url=api, timeout=30)
        c.post("/v1/items", json={"items": [{"item_id": f"m{n}", "text": t}
                                            for n, t in enumerate(MOVIES)]}).raise_for_status()
        store = RedisStore(redis_url, "bench-lag")
        loop = asyncio.new_event_loop()
        for n in tqdm(range(args.lag_samples), desc="feedback to served version", unit="click"):
            slate = c.post("/v1/recommend", json={"user_id": f"u{n % 5}", "k": 3}).json()
            r = c.post("/v1/feedback", json={"request_id": slate["request_id"],
                                             "item_id": slate["items"][0]["item_id"],
                                             "event": "click"})
            accepted_at = time.perf_counter()
            r.raise_for_status()
            version = loop.run_until_complete(_store_version_holding(store, n + 1, 30))
            while c.post("/v1/recommend", json={"user_id": "probe", "k": 1}
                         ).json()["model_version"] < version:
                time.sleep(0.005)
            lags.append(time.perf_counter() - accepted_at)
            time.sleep(rng.uniform(0.2, 1.5))  # clicks arrive at random moments
        loop.run_until_complete(store.close())
        loop.close()
    return lags


# -- 3. takeover -------------------------------------------------------------------
def takeover(redis_url: str) -> float:
    """Seconds from the SIGKILL of the lease holder to the standby holding the lease."""
    env = {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": "bench-takeover",
           "RECSVC_REPLAY_PREFAULT": "false"}
    with running_service_process(env, command="learner") as (u1, p1), \
            running_service_process(env, command="learner") as (u2, p2):
        learners = {u1: p1, u2: p2}
        holder = next(u for u in learners if httpx.get(f"{u}/status").json()["active"])
        standby = next(u for u in learners if u != holder)
        os.kill(learners[holder].pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        while not httpx.get(f"{standby}/status").json()["active"]:
            time.sleep(0.01)
        return time.perf_counter() - killed_at


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slates", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--click-rate", type=float, default=0.05)
    parser.add_argument("--lag-samples", type=int, default=30)
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--only-throughput", action="store_true")
    parser.add_argument("--read-count", type=int, default=Settings().learner_read_count,
                        help="RECSVC_LEARNER_READ_COUNT of the throughput learner")
    args = parser.parse_args(argv)

    with private_redis() as url:
        t = asyncio.run(throughput(args, url))
    lags, takeovers = [], []
    if not args.only_throughput:
        with private_redis() as url:
            lags = lag(args, url)
        for _ in tqdm(range(args.takeovers), desc="takeovers", unit="kill"):
            with private_redis() as url:
                takeovers.append(takeover(url))

    rate = t["transitions"] / t["seconds"]
    print(f"\nlearner throughput, one learner on a private Redis, {os.cpu_count()} cores")
    print(f"  {t['entries']:,} stream entries ({args.slates:,} slates of {SLATE}, "
          f"{t['clicks']:,} clicks) -> {t['transitions']:,} transitions, "
          f"{t['feedback_learned']:.0f} feedback learned, {t['updates']:,} gradient steps "
          f"of batch 64 (RECSVC_LEARNER_READ_COUNT={args.read_count})")
    print(f"  {t['seconds']:.1f} s: {rate:,.0f} transitions/s, "
          f"{t['entries'] / t['seconds']:,.0f} stream entries/s, "
          f"{t['updates'] / t['seconds']:.1f} gradient steps/s")
    print(f"  target 2,000 transitions/s (a managed service's ceiling: ~2,000 events/s): "
          f"{'met' if rate >= 2000 else 'NOT met'}")
    if lags:
        print(f"feedback -> served version lag (1 API replica + 1 learner, defaults): "
              f"{percentiles(lags)}")
    if takeovers:
        print(f"takeover after SIGKILL of the lease holder (lease TTL 5 s): "
              f"{percentiles(takeovers)}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
