"""Resident memory and start-up of one API replica holding a large catalog.

A production replica (``RECSVC_ROLE=api``) keeps the whole catalog's embeddings and
its FAISS index in memory; this measures what that costs at ``--items`` items.

The catalog is written straight into a private Redis through the service's own
store (``store.catalog.put_items``), with synthetic 384-d embeddings (``TopicSpace``, as
in ``bench.retrieval``): embedding a million titles takes about 90 minutes on this
machine's CPU, and that cost is ingestion's (``bench.load`` measures it), not the
replica's. Then one ``recsvc serve`` starts against that Redis; the benchmark
reports how long it took to be ready, its resident memory (``VmRSS``, and the peak
``VmHWM``) and Redis's, then serves ``--requests`` recommendations and reports the
memory again.

    python -m bench.replica [--items 1000000] [--requests 2000]

Needs ``redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import numpy as np
import redis
from tqdm import tqdm

from app.store import ItemRecord
from app.store.redis_store import RedisStore
from app.tools.processes import private_redis, running_service_process
from bench.retrieval import TopicSpace
from bench.soak import post_concurrently, proc_memory_mb

DIM = 384
PREFIX = "replica"


async def write_catalog(redis_url: str, n: int, seed: int, chunk: int = 10_000) -> float:
    """Store ``n`` items with synthetic embeddings; returns items/s."""
    store = RedisStore(redis_url, prefix=PREFIX)
    space = TopicSpace(DIM, topics=max(n // 500, 20), seed=seed)
    t = time.perf_counter()
    with tqdm(total=n, desc="catalog into Redis", unit="item") as bar:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            vectors = space.sample(m, seed=seed + 1 + start // chunk)
            await store.catalog.put_items([
                ItemRecord(f"i-{start + j}", f"synthetic item {start + j}", ["synthetic"], True,
                           vectors[j].tobytes(), f"synthetic:{start + j}") for j in range(m)])
            bar.update(m)
    rate = n / (time.perf_counter() - t)
    await store.close()
    return rate


def serve(url: str, requests: int, users: int, seed: int) -> float:
    """``requests`` recommendations from 16 concurrent clients; returns req/s."""
    rng = np.random.default_rng(seed)
    asks = [{"user_id": f"u-{u}", "k": 10} for u in rng.integers(1, users + 1, requests)]
    return post_concurrently(url, "/v1/recommend", asks, "recommend", "req")[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--service-env", nargs="*", default=[], metavar="RECSVC_X=V")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.service_env)
    with private_redis() as redis_url:
        rate = asyncio.run(write_catalog(redis_url, args.items, args.seed))
        redis_mb = redis.Redis.from_url(redis_url).info("memory")["used_memory"] / 2**20
        print(f"catalog: {args.items:,} items written to Redis at {rate:,.0f} items/s "
              f"(Redis holds {redis_mb:,.0f} MB)", flush=True)
        env = {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": PREFIX,
               "RECSVC_ROLE": "api", "RECSVC_DEVICE": "cpu", **extra}
        t = time.perf_counter()
        with running_service_process(env, startup_s=3600) as (url, proc):
            ready_s = time.perf_counter() - t
            size = httpx.get(f"{url}/readyz", timeout=10).json()
            at_ready = proc_memory_mb(proc.pid)
            rps = serve(url, args.requests, args.users, args.seed)
            after = proc_memory_mb(proc.pid)
    print(f"\nreplica (RECSVC_ROLE=api) over {args.items:,} items "
          f"(/readyz: {size})")
    print(f"  {'ready after':<32} {ready_s:8.1f} s  (catalog read from Redis and indexed)")
    print(f"  {'RSS when ready':<32} {at_ready['VmRSS']:8.0f} MB (peak {at_ready['VmHWM']:.0f} MB)")
    print(f"  {f'RSS after {args.requests:,} recommendations':<32} {after['VmRSS']:8.0f} MB "
          f"(peak {after['VmHWM']:.0f} MB; {rps:.0f} req/s from 16 clients)")
    print("  target: <= 4,096 MB")


if __name__ == "__main__":
    main()
