"""Recommend throughput by device and worker count, on one machine, in one run.

``bench.load`` measures one service process against the floor. This runs a list of
configurations of the same service over one catalog and one set of users, so that
the CPU and the CUDA path, and ``--workers`` from 1 to N, are compared side by side
on the same machine, with the floor (``bench.floor``) from the same run:

1. a private ``redis-server`` (the production store; the snapshot is kept in
   ``--cache-dir`` as ``bench.load`` keeps it, so a second run skips re-embedding);
2. the catalog of ``--items`` items through ``POST /v1/items`` and ``--users`` users'
   histories through ``POST /v1/events``, by a service on ``--ingest-device`` (the
   ingestion rate is printed: on CUDA it measures the GPU encoder through HTTP);
3. the floor, at each ``--connections`` count;
4. for each ``--configs`` entry ``DEVICE:WORKERS`` (``cpu:1``, ``cuda:4``, ...): an API
   replica (``RECSVC_ROLE=api``, as ``bench.service_load``) with
   ``RECSVC_DEVICE=DEVICE`` and ``RECSVC_WORKERS=WORKERS`` is started and warmed, then
   ``wrk -t{--wrk-threads}`` with ``bench/wrk/traffic.lua`` runs for ``--seconds`` at
   each connection count, while the cores used by the service (its workers
   included), Redis and ``wrk`` are read from ``/proc``.

Each row is printed as soon as it is measured, so a run cut short keeps its rows.

    python -m bench.scaling [--items 100000] [--configs cpu:1,cuda:1,cuda:4]
        [--connections 16,64] [--seconds 10]

Needs ``wrk`` and ``redis-server``; a ``cuda`` entry needs a CUDA device.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from app.tools.processes import private_redis, running_service_process
from bench.load import cache_workdir, histories, load_catalog, run_floor, wait_redis
from bench.service_load import cores_used, pids_of, pids_of_children
from bench.soak import wrk

HEADER = (f"{'device':<6} {'workers':>7} {'conns':>5} {'req/s':>8} {'x floor':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'service':>7} {'redis':>5} {'wrk':>5}")


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``"cpu:1,cuda:4"`` → ``[("cpu", 1), ("cuda", 4)]``."""
    configs = []
    for entry in text.split(","):
        device, _, workers = entry.strip().partition(":")
        if device not in {"cpu", "cuda"} or not workers.isdigit() or int(workers) < 1:
            raise argparse.ArgumentTypeError(f"{entry!r} is not DEVICE:WORKERS "
                                             "(cpu or cuda, then a count of at least 1)")
        configs.append((device, int(workers)))
    return configs


def measure(url: str, pid: int, redis_port: str, seconds: int, connections: int,
            threads: int, traffic: dict[str, str]) -> dict:
    """One ``wrk`` run with the cores each group of processes used meanwhile."""
    cores: dict[str, float] = {}
    sampler = threading.Thread(target=cores_used, args=(
        {"service": lambda: [pid, *pids_of_children(pid)],
         "redis": lambda: pids_of(f"redis-server.*:{redis_port}( |$)"),
         "wrk": lambda: pids_of("(^|/)wrk -t")}, 1.0, max(seconds - 2, 1), cores))
    sampler.start()
    res = wrk(url, seconds, connections, threads, traffic)
    sampler.join()
    return {**res, "cores": cores}


def parse_counts(text: str) -> list[int]:
    """``"16,64"`` → ``[16, 64]``."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts")
    return counts


def row(device: str, workers: int | str, connections: int, res: dict, floor_rate: float) -> str:
    cores = res.get("cores", {})
    return (f"{device:<6} {workers!s:>7} {connections:>5} {res['rate']:8.0f} "
            f"{res['rate'] / floor_rate:7.3f} {res['p50_us'] / 1000:7.2f} "
            f"{res['p99_us'] / 1000:7.2f} {res['errors']:6d} "
            f"{cores.get('service', float('nan')):7.2f} {cores.get('redis', float('nan')):5.2f} "
            f"{cores.get('wrk', float('nan')):5.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--events", type=int, default=8, help="history events per user")
    ap.add_argument("--contexts", type=int, default=50, help="distinct context texts")
    ap.add_argument("--configs", type=parse_configs, default=parse_configs("cpu:1,cpu:2"),
                    help="DEVICE:WORKERS entries, comma-separated, measured in this order")
    ap.add_argument("--connections", type=parse_counts, default=parse_counts("16"),
                    help="wrk connection counts, comma-separated (each config at each)")
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5, help="seconds of traffic first")
    ap.add_argument("--ingest-device", choices=["cpu", "cuda"], default="cpu",
                    help="the device of the service that embeds the catalog")
    ap.add_argument("--startup-s", type=float, default=300,
                    help="how long a service may take to answer /readyz")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "recsvc" / "bench-load"),
                    help="keeps the embedded catalog between runs ('' to start empty)")
    ap.add_argument("--service-env", nargs="*", default=[], metavar="RECSVC_X=V")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    conns = args.connections
    if min(conns) < args.wrk_threads:  # wrk refuses it, and the floor runs before any config
        sys.exit(f"every connection count must be at least --wrk-threads ({args.wrk_threads})")
    traffic = {"SOAK_USERS": str(args.users), "SOAK_CONTEXTS": str(args.contexts)}
    workdir = cache_workdir(args.cache_dir, args.items) if args.cache_dir else None
    extra = dict(kv.split("=", 1) for kv in args.service_env)
    print(f"scaling: {args.items:,} items, {args.users:,} users, wrk -t{args.wrk_threads} "
          f"-c{','.join(map(str, conns))} for {args.seconds}s after {args.warmup}s of warm-up",
          flush=True)
    with private_redis(workdir) as redis_url:
        wait_redis(redis_url)
        port = redis_url.rsplit(":", 1)[1].split("/")[0]
        base = {"RECSVC_REDIS_URL": redis_url, "RECSVC_KEY_PREFIX": "load", **extra}
        t = time.perf_counter()
        with running_service_process({**base, "RECSVC_DEVICE": args.ingest_device},
                                     args.startup_s) as (url, _):
            print(f"service ({args.ingest_device}) ready in {time.perf_counter() - t:.1f} s",
                  flush=True)
            print(load_catalog(url, args.items, redis_url, workdir is not None)
                  .replace("CPU encoder", f"{args.ingest_device} encoder"), flush=True)
            print(histories(url, args, redis_url, workdir is not None), flush=True)
        floors = {}
        for c in conns:
            floors[c] = run_floor(args.seconds, c, traffic, wrk_threads=args.wrk_threads)
        print("\n" + HEADER, flush=True)
        for c in conns:
            print(row("floor", "-", c, floors[c], floors[c]["rate"]), flush=True)
        for device, workers in args.configs:
            env = {**base, "RECSVC_ROLE": "api", "RECSVC_DEVICE": device,
                   "RECSVC_WORKERS": str(workers)}
            t = time.perf_counter()
            try:
                with running_service_process(env, args.startup_s) as (url, proc):
                    ready_s = time.perf_counter() - t
                    wrk(url, args.warmup, max(conns), args.wrk_threads, traffic)
                    for c in conns:
                        res = measure(url, proc.pid, port, args.seconds, c, args.wrk_threads,
                                      traffic)
                        print(row(device, workers, c, res, floors[c]["rate"])
                              + f"   (ready in {ready_s:.0f} s)", flush=True)
            # one configuration failing (its start, wrk or reading its output, a request)
            # leaves the others
            except (RuntimeError, subprocess.CalledProcessError, StopIteration, ValueError,
                    KeyError, httpx.HTTPError) as exc:
                print(f"{device}:{workers} failed: {str(exc)[-2000:]}", flush=True)
    print("\nx floor: requests/s over the floor's (the same stack doing no work, one "
          "process) at the same connections; service/redis/wrk: cores used")


if __name__ == "__main__":
    main()
