"""HTTP load: ``POST /v1/recommend`` against the floor of the same web stack.

Starts a private ``redis-server`` and one ``recsvc serve`` process against it (the
production store), then:

1. loads ``--items`` catalog items through ``POST /v1/items`` (MovieLens-100k
   titles and variants) and reports the ingestion rate. The embedded catalog is
   kept in ``--cache-dir`` (a Redis snapshot) so later runs skip re-embedding;
2. gives ``--users`` users a history of ``--events`` interactions each through
   ``POST /v1/events`` (kept in the snapshot too);
3. warms the caches for ``--warmup`` seconds (contexts repeat, as real traffic
   does; the related source's neighbour lists fill), then runs
   ``wrk -t2 -c16`` for ``--seconds`` with ``bench/wrk/traffic.lua``, varying users
   and contexts, recommend only;
4. serves ``--feedback-slates`` more slates, then runs ``wrk`` with
   ``bench/wrk/feedback.lua`` for ``--seconds``: ``POST /v1/feedback`` only, a click
   on each item of those slates in turn (the feedback target is 2,000/s);
5. stops the service, starts the floor (``bench.floor``: the same FastAPI and
   uvicorn stack parsing the same body and returning a slate of the same shape,
   doing no work) and runs the same ``wrk`` against it; then the same with the
   floor doing a recommendation's store I/O (the user read and the impression
   write, on the same Redis and users), which splits the service's cost into what
   the contract's I/O costs and what the model costs;
6. prints all three, the throughput ratio and the p99 ratio, and the feedback rate.

``--topology api+learner`` runs the production topology instead of one process: an
API replica (``RECSVC_ROLE=api``) with a ``recsvc learner`` process beside it;
``--topology api`` the API replica alone (what one replica can serve when the
learner has its own machine).

    python -m bench.load [--items 100000] [--users 5000] [--seconds 30]

Needs ``wrk`` (Debian: apt-get install wrk) and ``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from tqdm import tqdm

from app.tools.client import wait_ready
from app.tools.processes import free_port, private_redis, running_service_process, stop
from bench.latency import catalog
from bench.soak import post_concurrently, run_wrk, wrk


def wait_redis(url: str, timeout: float = 300.0) -> None:
    """Wait until Redis has loaded its snapshot (it answers LOADING until then)."""
    deadline = time.time() + timeout
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.BusyLoadingError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def load_catalog(url: str, n: int, redis_url: str, cached: bool) -> str:
    items = catalog(n)
    with httpx.Client(base_url=url, timeout=600) as c:
        if cached and c.get(f"/v1/items/{items[-1]['item_id']}").status_code == 200:
            return f"catalog of {n:,} items restored from the cache (not re-embedded)"
        t = time.perf_counter()
        with tqdm(total=n, desc="catalog", unit="item") as bar:
            for start in range(0, n, 1000):
                c.post("/v1/items", json={"items": items[start:start + 1000]}).raise_for_status()
                bar.update(len(items[start:start + 1000]))
        rate = n / (time.perf_counter() - t)
    redis.Redis.from_url(redis_url).save()
    return f"ingestion: {n:,} items at {rate:.0f} items/s (CPU encoder, through HTTP)"


def give_histories(url: str, users: int, events: int, items: int, seed: int) -> float:
    """``events`` interactions per user through POST /v1/events; returns events/s."""
    rng = np.random.default_rng(seed)
    ids = [it["item_id"] for it in catalog(min(items, 20_000))]
    kinds = ["click", "click", "purchase", "like", "skip"]
    posts = [{"user_id": f"u-{u}", "item_id": ids[int(rng.integers(len(ids)))],
             "event": kinds[int(rng.integers(len(kinds)))]}
             for u in range(1, users + 1) for _ in range(events)]
    return post_concurrently(url, "/v1/events", posts, "histories", "event")[1]


def histories(url: str, args: argparse.Namespace, redis_url: str, cached: bool) -> str:
    """Give the users their histories, unless the cached snapshot has them already (it
    is saved again after they are given, before any traffic)."""
    if cached:
        last = httpx.get(f"{url}/v1/users/u-{args.users}", timeout=30)
        if last.status_code == 200 and len(last.json()["history"]) >= args.events:
            return f"histories of {args.users:,} users restored from the cache"
    rate = give_histories(url, args.users, args.events, args.items, args.seed)
    if cached:
        redis.Redis.from_url(redis_url).save()
    return f"histories: {args.users * args.events:,} events at {rate:.0f} events/s"


FEEDBACK_LUA = Path(__file__).with_name("wrk") / "feedback.lua"


def served_pairs(url: str, slates: int, users: int, path: str) -> int:
    """Serve ``slates`` slates and write their ``request_id item_id`` pairs to ``path``:
    the feedback a client could send. Returns the number of pairs."""
    rng = np.random.default_rng(1)
    asks = [{"user_id": f"u-{u}", "k": 10} for u in rng.integers(1, users + 1, slates)]
    bodies, _ = post_concurrently(url, "/v1/recommend", asks, "slates for feedback", "slate")
    lines = [f"{b['request_id']} {it['item_id']}" for b in bodies for it in b["items"]]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def measure_feedback(url: str, slates: int, users: int, seconds: int,
                     connections: int) -> tuple[dict, int]:
    """Serve ``slates`` slates, then ``wrk`` clicks on their items for ``seconds``:
    the feedback result and the number of (slate, item) pairs clicked on."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = os.path.join(tmp, "pairs.txt")
        n_pairs = served_pairs(url, slates, users, pairs_path)
        return wrk_feedback(url, seconds, connections, pairs_path), n_pairs


def cache_workdir(cache_dir: str, items: int) -> str:
    """Where the Redis snapshot of an ``items``-item catalog and its users is kept."""
    return os.path.join(cache_dir, f"items-{items}")


def service_env(redis_url: str, topology: str, service_env_args: list[str]) -> dict[str, str]:
    """The environment of the service under test: the private Redis, the CPU, the
    API role unless ``topology`` is ``all``, and ``RECSVC_X=V`` overrides."""
    env = {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": "load", "RECSVC_DEVICE": "cpu",
           **dict(kv.split("=", 1) for kv in service_env_args)}
    if topology != "all":
        env["RECSVC_ROLE"] = "api"
    return env


def wrk_feedback(url: str, seconds: int, connections: int, pairs_path: str) -> dict:
    """``wrk`` posting feedback on served slates, with the accepted rate and errors."""
    res = run_wrk(FEEDBACK_LUA, url, seconds, connections, 2, {"FEEDBACK_PAIRS": pairs_path})
    res["rate"] = res["accepted"] / (res["duration_us"] / 1e6)
    res["errors"] = res["other"] + res["connect"] + res["read"] + res["write"] + res["timeout"]
    return res


def run_floor(seconds: int, connections: int, traffic: dict,
              redis_url: str | None = None, wrk_threads: int = 2) -> dict:
    """``wrk`` against the floor; with ``redis_url``, the floor that also does a
    recommendation's store I/O (on the service's keys: the same users' histories)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    io = ["--redis-url", redis_url, "--key-prefix", "load"] if redis_url else []
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "--port", str(port), *io])
    try:
        if not wait_ready(url, lambda: proc.poll() is None, 60):
            raise RuntimeError("the floor did not start")
        wrk(url, 3, connections, wrk_threads, traffic)
        return wrk(url, seconds, connections, wrk_threads, traffic)
    finally:
        stop(proc, grace_s=20)


def line(name: str, res: dict) -> str:
    return (f"{name:<28} {res['rate']:9.0f} {res['p50_us'] / 1000:8.2f} "
            f"{res['p99_us'] / 1000:8.2f} {res['errors']:7d}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--events", type=int, default=8, help="history events per user")
    ap.add_argument("--contexts", type=int, default=50, help="distinct context texts")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "recsvc" / "bench-load"),
                    help="keeps the embedded catalog between runs ('' to start empty)")
    ap.add_argument("--service-env", nargs="*", default=[], metavar="RECSVC_X=V")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feedback-slates", type=int, default=10_000,
                    help="slates served to send feedback on (10 clicks each)")
    ap.add_argument("--topology", choices=["all", "api+learner", "api"], default="all",
                    help="all: one `recsvc serve` that also learns; api+learner: one API "
                         "replica (RECSVC_ROLE=api) and a `recsvc learner` process beside "
                         "it, as in production (here both share the machine's cores); api: "
                         "the API replica alone (the learner runs on another machine in "
                         "production; here none runs, and events wait in the stream)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="seconds of recommend traffic before the measured run (fills the "
                         "context cache and the neighbour lists of the related source)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    workdir = cache_workdir(args.cache_dir, args.items) if args.cache_dir else None
    traffic = {"SOAK_USERS": str(args.users), "SOAK_CONTEXTS": str(args.contexts)}

    print(f"load benchmark: {args.items:,} items, {args.users:,} users with "
          f"{args.events} events each, {args.contexts} contexts, wrk -t2 -c{args.connections} "
          f"{args.seconds}s, one service process"
          + {"all": "", "api+learner": " (RECSVC_ROLE=api) and a learner process",
             "api": " (RECSVC_ROLE=api), no learner"}[args.topology]
          + f", {args.warmup}s warm-up",
          flush=True)
    with private_redis(workdir) as redis_url, contextlib.ExitStack() as stack:
        wait_redis(redis_url)
        env = service_env(redis_url, args.topology, args.service_env)
        if args.topology == "api+learner":
            stack.enter_context(running_service_process(env, 600, command="learner"))
        with running_service_process(env, 600) as (url, _):
            print(load_catalog(url, args.items, redis_url, workdir is not None), flush=True)
            print(histories(url, args, redis_url, workdir is not None), flush=True)
            wrk(url, args.warmup, args.connections, 2, traffic)  # every context cached
            service = wrk(url, args.seconds, args.connections, 2, traffic)
            feedback, n_pairs = measure_feedback(url, args.feedback_slates, args.users,
                                                 args.seconds, args.connections)
        stack.close()  # the learner, if any, stops too: the floors run alone
        floor_io = run_floor(args.seconds, args.connections, traffic, redis_url)
    floor = run_floor(args.seconds, args.connections, traffic)

    print(f"\n{'POST /v1/recommend':<28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print(line("floor (same stack, no work)", floor))
    print(line("floor + store I/O, no model", floor_io))
    print(line("recsvc", service))
    print(f"\nthroughput ratio recsvc / floor: {service['rate'] / floor['rate']:.3f} "
          f"(target >= 0.25, goal 0.5)")
    print(f"p99 ratio recsvc / floor: {service['p99_us'] / floor['p99_us']:.2f} "
          f"(target <= 5)")
    print(f"floor + store I/O / floor: {floor_io['rate'] / floor['rate']:.3f} (the user read "
          f"and the impression write alone); recsvc / that: "
          f"{service['rate'] / floor_io['rate']:.3f}")
    print(f"\n{'POST /v1/feedback':<28} {'ok/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print(line("recsvc", feedback))
    print(f"(clicks on the {n_pairs:,} items of {args.feedback_slates:,} served slates, "
          f"{feedback['accepted']:,} accepted; target >= 2,000/s)")


if __name__ == "__main__":
    main()
