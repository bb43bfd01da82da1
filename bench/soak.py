"""Soak: the service under steady load for minutes, watching errors, p99 and memory.

Starts a private ``redis-server`` and ``recsvc serve`` against it (the production
store, so Redis memory is measured too), or with ``--store embedded`` the default
single process with its in-process store (then the process's memory holds every
impression and marker until they expire), loads a catalog, then:

1. measures the maximum recommend throughput with ``wrk -t2 -c16`` (recommend only);
2. runs ``--minutes`` of traffic at ``--load`` (default half) of that maximum, with
   clicks as ``--feedback`` (default 10%) of all requests, in ``--segment-s`` slices
   of ``wrk``. Each slice prints its rate, errors, p50/p99, the service's resident
   memory, and Redis's memory, key count and stream lengths. The request rate is
   held by wrk's per-connection delay, corrected after every slice.

    python -m bench.soak [--minutes 10] [--items 5000] [--users 2000]
                         [--store redis|embedded] [--service-env RECSVC_X=V ...]

Needs ``wrk`` (Debian: apt-get install wrk) and ``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis
from tqdm import tqdm

from app.tools.processes import private_redis, running_service_process
from bench.latency import catalog

LUA = Path(__file__).with_name("wrk") / "traffic.lua"


def run_wrk(script: Path, url: str, seconds: int, connections: int, threads: int,
            env: dict[str, str]) -> dict:
    """One wrk run of a Lua ``script``; returns the JSON line its ``done`` printed."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
         "-s", str(script), url], env={**os.environ, **env}, capture_output=True, text=True,
        check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON "))
    return json.loads(line.removeprefix("WRKJSON "))


def wrk(url: str, seconds: int, connections: int, threads: int, env: dict[str, str]) -> dict:
    """One wrk run of ``traffic.lua``, with its request rate and error count."""
    result = run_wrk(LUA, url, seconds, connections, threads, env)
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = (result["connect"] + result["read"] + result["write"]
                        + result["timeout"] + result["rec_other"] + result["fb_other"]
                        + result["unknown"])
    return result


def post_concurrently(url: str, path: str, bodies: Sequence[dict], desc: str, unit: str,
                      clients: int = 16) -> tuple[list[dict], float]:
    """POST each body to ``path`` from ``clients`` concurrent clients, with a progress
    bar; returns the JSON responses (in order) and the rate per second. Any non-2xx
    response raises."""
    with httpx.Client(base_url=url, timeout=60,
                      limits=httpx.Limits(max_connections=clients)) as c, \
            tqdm(total=len(bodies), desc=desc, unit=unit) as bar:
        def send(body: dict) -> dict:
            r = c.post(path, json=body)
            r.raise_for_status()
            bar.update(1)
            return r.json()
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            responses = list(pool.map(send, bodies))
        return responses, len(bodies) / (time.perf_counter() - t)


def proc_memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of a process, in MB."""
    out = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0]) / 1024
    return out


def rss_mb(pid: int) -> float:
    return proc_memory_mb(pid)["VmRSS"]


def redis_figures(client: redis.Redis | None, prefix: str) -> dict:
    if client is None:  # the embedded store: its memory is the process's
        return {"redis_mb": 0.0, "keys": 0, "stream": 0, "log": 0}
    info = client.info("memory")
    return {"redis_mb": info["used_memory"] / 2**20, "keys": client.dbsize(),
            "stream": client.xlen(f"{prefix}:events"), "log": client.xlen(f"{prefix}:log")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--segment-s", type=int, default=30)
    ap.add_argument("--load", type=float, default=0.5, help="share of the measured maximum")
    ap.add_argument("--feedback", type=float, default=0.1, help="share of requests that click")
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--contexts", type=int, default=50)
    ap.add_argument("--connections", type=int, default=8, help="wrk connections while soaking")
    ap.add_argument("--calibrate-s", type=int, default=20)
    ap.add_argument("--store", choices=["redis", "embedded"], default="redis")
    ap.add_argument("--service-env", nargs="*", default=[], metavar="RECSVC_X=V",
                    help="extra settings of the service, e.g. RECSVC_IMPRESSION_TTL_S=120")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.service_env)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")

    prefix = "soak"
    traffic = {"SOAK_USERS": str(args.users), "SOAK_CONTEXTS": str(args.contexts)}
    with contextlib.ExitStack() as stack:
        env = {"RECSVC_DEVICE": "cpu", **extra}
        r = None
        if args.store == "redis":
            redis_url = stack.enter_context(private_redis())
            env |= {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": prefix}
            r = redis.Redis.from_url(redis_url)
        url, proc = stack.enter_context(running_service_process(env))
        items = catalog(args.items)
        with httpx.Client(base_url=url, timeout=300) as c, \
                tqdm(total=len(items), desc="catalog", unit="item") as bar:
            for start in range(0, len(items), 500):
                c.post("/v1/items", json={"items": items[start:start + 500]}).raise_for_status()
                bar.update(len(items[start:start + 500]))

        # warm the context cache, then the maximum recommend rate
        wrk(url, 5, 4, 1, traffic)
        peak = wrk(url, args.calibrate_s, 16, 2, traffic)
        target = args.load * peak["rate"]
        print(f"maximum recommend throughput: {peak['rate']:.0f} req/s "
              f"(wrk -t2 -c16, p99 {peak['p99_us'] / 1000:.1f} ms, errors {peak['errors']}); "
              f"soaking at {target:.0f} req/s with {args.feedback:.0%} clicks", flush=True)

        segments = max(1, round(args.minutes * 60 / args.segment_s))
        cycle_ms = args.connections * 1000 / target  # per connection, request to request
        delay = max(0.0, cycle_ms - peak["p50_us"] / 1000 / 2)
        rows = []
        start_rss, start_redis = rss_mb(proc.pid), redis_figures(r, prefix)
        print(f"{'min':>5} {'req/s':>7} {'errors':>6} {'clicks':>6} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7} {'rss MB':>7} {'redis MB':>8} {'keys':>7} "
              f"{'stream':>6} {'log':>6}", flush=True)
        t0 = time.time()
        for _ in range(segments):
            env = {**traffic, "SOAK_DELAY_MS": str(int(delay)),
                   "SOAK_FEEDBACK": str(args.feedback)}
            res = wrk(url, args.segment_s, args.connections, 1, env)
            row = {**res, "minute": (time.time() - t0) / 60, "rss_mb": rss_mb(proc.pid),
                   **redis_figures(r, prefix)}
            rows.append(row)
            print(f"{row['minute']:5.1f} {row['rate']:7.1f} {row['errors']:6d} "
                  f"{row['fb_ok']:6d} {row['p50_us'] / 1000:7.2f} {row['p99_us'] / 1000:7.2f} "
                  f"{row['max_us'] / 1000:7.1f} {row['rss_mb']:7.0f} {row['redis_mb']:8.1f} "
                  f"{row['keys']:7d} {row['stream']:6d} {row['log']:6d}", flush=True)
            # hold the rate: stretch or shorten the per-connection pause
            delay = max(0.0, delay + (res["rate"] / target - 1) * cycle_ms)

        total = sum(row["requests"] for row in rows)
        errors = sum(row["errors"] for row in rows)
        kinds = {k: sum(row[k] for row in rows) for k in (
            "connect", "read", "write", "timeout", "rec_other", "fb_other", "unknown")}
        clicks = sum(row["fb_ok"] for row in rows)
        first_rss, end_rss = rows[0]["rss_mb"], rows[-1]["rss_mb"]
        p99s = [row["p99_us"] / 1000 for row in rows]
        print(f"\nsoak: {total} requests in {args.minutes:.0f} min "
              f"({total / (args.minutes * 60):.0f} req/s; target {target:.0f}), "
              f"{clicks} clicks accepted, {errors} errors {kinds}")
        if extra:
            print(f"service settings changed from the defaults: {extra}")
        print(f"p99 per {args.segment_s}s slice: min {min(p99s):.1f} ms, "
              f"median {sorted(p99s)[len(p99s) // 2]:.1f} ms, max {max(p99s):.1f} ms")
        print(f"service RSS: {start_rss:.0f} MB at the start, {first_rss:.0f} MB after the "
              f"first slice, {end_rss:.0f} MB at the end "
              f"({(end_rss / first_rss - 1):+.1%} from the first slice, "
              f"{(end_rss / start_rss - 1):+.1%} from the start)")
        print(f"redis: {start_redis['redis_mb']:.1f} MB -> {rows[-1]['redis_mb']:.1f} MB, "
              f"keys {start_redis['keys']} -> {rows[-1]['keys']}, "
              f"unprocessed stream entries at the end {rows[-1]['stream']}, "
              f"evaluation log {rows[-1]['log']} records")
        model = httpx.get(f"{url}/v1/model").json()
        print(f"model at the end of the load: version {model['version']}, updates "
              f"{model['updates']}, feedback learned {model['feedback_learned']} of "
              f"{clicks} accepted clicks")
        idle = time.time()
        while model["feedback_learned"] < clicks and time.time() - idle < 120:
            time.sleep(0.5)
            model = httpx.get(f"{url}/v1/model").json()
        print(f"learner caught up {time.time() - idle:.1f} s after the load stopped: "
              f"feedback learned {model['feedback_learned']} of {clicks}")


if __name__ == "__main__":
    main()
