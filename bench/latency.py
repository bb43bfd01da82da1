"""Recommend latency with a warm embedding cache, feedback latency, and item ingestion.

Starts ``recsvc serve`` (embedded store) as a subprocess and drives it over HTTP:

1. ingestion: upserts the MovieLens-100k movies (plus synthetic variants up to
   ``--items``) in batches of 500 and reports items/s (the CPU encoder's rate
   through the whole HTTP path);
2. recommend: ``--users`` users with contexts drawn from a small set of texts
   (as real traffic repeats them), first a warm-up pass so every context is
   cached, then ``--requests`` sequential calls: p50/p95/p99 latency;
3. concurrency: the same with ``--concurrency`` client threads: throughput;
4. feedback: p50/p99 of POST /v1/feedback.

    python -m bench.latency [--items 5000] [--requests 2000]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from tqdm import tqdm

from app.tools.movielens import load
from app.tools.processes import running_service


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return (f"p50 {np.percentile(a, 50):6.2f} ms  p95 {np.percentile(a, 95):6.2f} ms  "
            f"p99 {np.percentile(a, 99):6.2f} ms  (n={len(a)})")


def catalog(n: int) -> list[dict]:
    movies = load().movies
    items = [{"item_id": f"m-{m.item_id}", "text": m.text} for m in movies]
    variant = 0
    while len(items) < n:
        m = movies[variant % len(movies)]
        items.append({"item_id": f"v{variant}", "text": f"{m.text} (edition {variant})"})
        variant += 1
    return items[:n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--contexts", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    items = catalog(args.items)
    contexts = [f"{18 + i % 50} year old {'male' if i % 2 else 'female'} "
                f"{['student', 'engineer', 'artist', 'writer', 'doctor'][i % 5]}, "
                f"{['weekday', 'weekend'][(i // 5) % 2]} {['morning', 'evening'][(i // 2) % 2]}"
                for i in range(args.contexts)]

    with running_service({"RECSVC_DEVICE": "cpu"}) as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        t0 = time.perf_counter()
        with tqdm(total=len(items), desc="ingesting", unit="item") as bar:
            for s in range(0, len(items), 500):
                c.post("/v1/items", json={"items": items[s:s + 500]}).raise_for_status()
                bar.update(len(items[s:s + 500]))
        ingest_s = time.perf_counter() - t0

        def body(i: int) -> dict:
            return {"user_id": f"u{int(rng.integers(args.users))}",
                    "context": {"text": contexts[i % len(contexts)]}, "k": 10}

        for i in range(len(contexts)):  # warm the embedding cache
            c.post("/v1/recommend", json=body(i)).raise_for_status()
        lat, slates = [], []
        for i in tqdm(range(args.requests), desc="recommend (sequential)"):
            t = time.perf_counter()
            r = c.post("/v1/recommend", json=body(int(rng.integers(len(contexts)))))
            lat.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
            if i % 10 == 0:
                slates.append(r.json())

        def one(i: int) -> float:
            t = time.perf_counter()
            r = pool_client.post("/v1/recommend", json=body(i))
            r.raise_for_status()
            return (time.perf_counter() - t) * 1000

        pool_client = httpx.Client(base_url=url, timeout=60,
                                   limits=httpx.Limits(max_connections=args.concurrency))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            conc = list(pool.map(one, range(args.requests)))
        conc_s = time.perf_counter() - t0
        pool_client.close()

        fb = []
        for s in slates:
            t = time.perf_counter()
            c.post("/v1/feedback", json={"request_id": s["request_id"],
                                         "item_id": s["items"][0]["item_id"],
                                         "event": "click"}).raise_for_status()
            fb.append((time.perf_counter() - t) * 1000)
        metrics = c.get("/metrics").text
        hit_ratio = next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("recsvc_encoder_cache_hit_ratio"))

    print()
    print(f"catalog: {len(items)} items, {args.users} users, {args.contexts} distinct contexts")
    print(f"ingestion (HTTP, CPU encoder, batches of 500): {len(items) / ingest_s:8.1f} items/s")
    print(f"recommend, 1 client, warm cache : {percentiles(lat)}")
    print(f"recommend, {args.concurrency} clients            : {percentiles(conc)}  "
          f"{args.requests / conc_s:7.1f} req/s")
    print(f"feedback, 1 client              : {percentiles(fb)}")
    print(f"encoder cache hit ratio         : {float(hit_ratio):.4f}")


if __name__ == "__main__":
    main()
