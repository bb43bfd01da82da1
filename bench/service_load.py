"""Recommend under load on the service alone, with the CPU each process used.

``bench.load`` measures the service against the floor, but one run takes minutes
and the machine's speed drifts between runs (the floor itself has measured from
2,395 to 3,881 requests/s with the same command). To compare two commits, run this
at each in turn, interleaved, several times: it restarts the service from the
catalog and histories ``bench.load`` cached (no re-embedding), warms it, runs
``wrk -t2 -c16`` with ``bench/wrk/traffic.lua`` and prints the request rate,
latencies and the cores used by the service, Redis and ``wrk`` meanwhile (from
``/proc``; a service using about one core is bound by its GIL). With
``--feedback-slates N`` it then serves N slates and posts clicks on their items
with ``bench/wrk/feedback.lua`` for ``--seconds`` (as ``bench.load`` does).

    python -m bench.service_load [--warmup 40] [--seconds 20] [--topology api]
        [--feedback-slates 3000] [--service-env RECSVC_WORKERS=2]

Needs ``wrk``, ``redis-server`` and a cache made by ``python -m bench.load``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.tools.processes import private_redis, running_service_process
from bench.load import cache_workdir, served_pairs, service_env, wait_redis, wrk_feedback
from bench.soak import wrk

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of the processes (0 for one that has exited)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def pids_of_children(pid: int) -> list[int]:
    """The worker processes of ``recsvc serve --workers N`` (``RECSVC_WORKERS``)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cores_used(finders: dict[str, Callable[[], list[int]]], settle_s: float,
               span_s: float, into: dict[str, float]) -> None:
    """Cores each group of processes used over ``span_s`` seconds after ``settle_s``
    (the groups are found then: ``wrk`` has started by that time)."""
    time.sleep(settle_s)
    processes = {name: find() for name, find in finders.items()}
    before = {name: cpu_seconds(pids) for name, pids in processes.items()}
    start = time.monotonic()
    time.sleep(span_s)
    elapsed = time.monotonic() - start
    into.update({name: (cpu_seconds(pids) - before[name]) / elapsed
                 for name, pids in processes.items()})


def measure_feedback_cpu(url: str, args: argparse.Namespace, service: list[int]) -> dict:
    """``bench.load``'s feedback measurement, with the service's CPU per accepted
    event (``cpu_ms``): steadier than the rate where the machine's speed drifts."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = os.path.join(tmp, "pairs.txt")
        served_pairs(url, args.feedback_slates, args.users, pairs_path)
        start = cpu_seconds(service)
        res = wrk_feedback(url, args.seconds, args.connections, pairs_path)
        res["cpu_ms"] = 1000 * (cpu_seconds(service) - start) / max(res["accepted"], 1)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="the cached catalog's size")
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--contexts", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=40, help="seconds of traffic first")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--topology", choices=["all", "api"], default="api",
                    help="api: RECSVC_ROLE=api, no learner (default); all: `recsvc serve`")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "recsvc" / "bench-load"))
    ap.add_argument("--service-env", nargs="*", default=[], metavar="RECSVC_X=V")
    ap.add_argument("--feedback-slates", type=int, default=0,
                    help="then serve this many slates and measure feedback on them")
    args = ap.parse_args(argv)
    workdir = cache_workdir(args.cache_dir, args.items)
    if not os.path.exists(os.path.join(workdir, "dump.rdb")):
        sys.exit(f"no cached catalog in {workdir}: run `python -m bench.load --items "
                 f"{args.items}` once first")
    traffic = {"SOAK_USERS": str(args.users), "SOAK_CONTEXTS": str(args.contexts)}
    with private_redis(workdir) as redis_url:
        wait_redis(redis_url)
        env = service_env(redis_url, args.topology, args.service_env)
        with running_service_process(env, 600) as (url, proc):
            print(f"warming up for {args.warmup} s", flush=True)
            wrk(url, args.warmup, args.connections, 2, traffic)
            port = redis_url.rsplit(":", 1)[1].split("/")[0]
            cores: dict[str, float] = {}
            sampler = threading.Thread(target=cores_used, args=(
                {"service": lambda: [proc.pid, *pids_of_children(proc.pid)],
                 "redis": lambda: pids_of(f"redis-server.*:{port}( |$)"),
                 "wrk": lambda: pids_of("^wrk ")}, 2.0, max(args.seconds - 4, 1), cores))
            sampler.start()
            res = wrk(url, args.seconds, args.connections, 2, traffic)
            sampler.join()
            feedback = None
            if args.feedback_slates:
                feedback = measure_feedback_cpu(url, args, [proc.pid,
                                                            *pids_of_children(proc.pid)])
    print(f"POST /v1/recommend: {res['rate']:.0f} req/s, p50 {res['p50_us'] / 1000:.1f} ms, "
          f"p99 {res['p99_us'] / 1000:.1f} ms, {res['errors']} errors")
    print("cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    if feedback is not None:
        print(f"POST /v1/feedback: {feedback['rate']:.0f} accepted/s, p50 "
              f"{feedback['p50_us'] / 1000:.1f} ms, p99 {feedback['p99_us'] / 1000:.1f} ms, "
              f"{feedback['errors']} errors, {feedback['cpu_ms']:.3f} ms of the service's "
              f"CPU per accepted event")


if __name__ == "__main__":
    main()
