"""The ``recsvc`` command: serve, learner, load-items, import-events, demo, export-log,
ope."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from app.tools.client import ServiceError
from app.tools.rows import InputError, Resume, count_rows, numbered_rows, refusal


def _settings():
    from app.logs import configure
    from app.settings import Settings

    settings = Settings()
    configure(settings.log_level, settings.log_format)
    return settings


def refuse_open_exposure(settings, host: str) -> None:
    """Exit when a service reachable from other hosts would answer anyone: no key is
    configured and the host is not a loopback address, unless ``RECSVC_ALLOW_OPEN``
    asks for it. The open development default stays on 127.0.0.1."""
    import ipaddress

    if settings.key_list or settings.admin_key_list or settings.allow_open:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        sys.exit(f"refusing to serve on {host} with no API key: set RECSVC_API_KEYS and "
                 "RECSVC_ADMIN_KEYS (or RECSVC_ALLOW_OPEN=true for an open service on "
                 "purpose)")


def _server_options(args: argparse.Namespace, settings) -> dict:
    """What one process and each worker serve with alike.

    SIGTERM: uvicorn stops accepting, drains in-flight requests (up to the grace
    period), then the app's lifespan flushes held impressions and the learner's
    uncommitted learning before the process exits. Connections and tasks are bounded
    in number (503 beyond); headers in size and time by the protocol each caller
    passes (``app.server.http_limits``)."""
    return dict(host=args.host, port=args.port, loop="uvloop",
                limit_concurrency=settings.max_concurrency, log_level="warning",
                access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s,
                log_config=None)  # uvicorn's own lines through recsvc's handler (JSON too)


def _uvicorn(app, args: argparse.Namespace, settings) -> None:
    import uvicorn

    from app.server.http_limits import limited_protocol

    uvicorn.run(app, http=limited_protocol(settings.max_header_bytes, settings.header_timeout_s),
                **_server_options(args, settings))


def _uvicorn_workers(args: argparse.Namespace, settings, workers: int) -> None:
    """``workers`` processes on one socket under this one, which supervises them: it
    restarts a worker that dies, passes SIGTERM on to each (each drains as one process
    does), and exits 3, as one process does, when a worker failed to start (the app or
    the store is broken: every restart would fail alike)."""
    import inspect
    import logging

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    # each worker builds its own app and protocol by name: uvicorn pickles this config
    # for them, and neither an app nor a class made at run time can be pickled
    config = uvicorn.Config(
        "app.server.api:app_of_worker", factory=True,
        http="app.server.http_limits:FROM_SETTINGS", **_server_options(args, settings),
        workers=workers,
        # a worker answers the supervisor's health check from a thread, which a long
        # hold of the GIL at start (imports, a large catalog indexed) delays; this is
        # also how long a worker's failed start takes to be noticed
        timeout_worker_healthcheck=20)
    # the supervisor's own lines (workers started, died, restarted) are worth keeping
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
    # uvicorn before 0.51 takes the workers' target (a server's run) from the caller
    target = ({"target": uvicorn.Server(config=config).run}
              if "target" in inspect.signature(Multiprocess).parameters else {})
    supervisor = Multiprocess(config, sockets=[config.bind_socket()], **target)
    supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def _serve(args: argparse.Namespace) -> None:
    import logging

    settings = _settings()
    refuse_open_exposure(settings, args.host)
    if settings.role == "api" and not settings.redis_url:
        sys.exit("RECSVC_ROLE=api needs RECSVC_REDIS_URL: API replicas and `recsvc learner` "
                 "share the store")
    workers = args.workers or settings.workers
    if workers > 1 and not settings.redis_url:
        logging.getLogger("recsvc").warning(
            "serving with one process, not %d: the embedded store keeps its state in memory "
            "in one process (set RECSVC_REDIS_URL for --workers)", workers)
        workers = 1
    # what each process is told it shares the machine with (--workers overrides the
    # setting): the engine gives torch its share of the cores (torch_threads_for)
    settings = settings.model_copy(update={"workers": workers})
    if workers > 1:  # each worker builds its own app (app_of_worker); this one supervises
        # and tells them how many they are (their settings come from the environment)
        os.environ["RECSVC_WORKERS"] = str(workers)
        _uvicorn_workers(args, settings, workers)
        return
    from app.server.api import create_app

    _uvicorn(create_app(settings, run_learner=settings.role == "all"), args, settings)


def _learner(args: argparse.Namespace) -> None:
    from app.learner.process import create_learner_app

    settings = _settings()
    refuse_open_exposure(settings, args.host)
    _uvicorn(create_learner_app(settings), args, settings)


def numbered_items(path: Path):
    """``(line number, item)`` from JSONL (one object per line) or CSV
    (item_id,text[,tags][,available])."""
    def item_of(row: dict[str, str]) -> dict:
        item: dict = {"item_id": row["item_id"], "text": row["text"]}
        if row.get("tags"):
            item["tags"] = [t for t in row["tags"].split("|") if t]
        if row.get("available"):
            item["available"] = row["available"].strip().lower() not in {"0", "false"}
        return item

    return numbered_rows(path, ("item_id", "text"), item_of)


def read_items(path: Path):
    """Items from JSONL or CSV (``numbered_items`` without the line numbers)."""
    return (item for _, item in numbered_items(path))


def _load_items(args: argparse.Namespace) -> None:
    """Upsert a file's items in batches, with progress. Resumable: the count of rows the
    service confirmed (or that were skipped) is kept beside the file (``<file>.loaded``,
    with the file's size and mtime), so a rerun after a crash or Ctrl-C continues where
    it stopped. Rows the service would refuse are reported by line and skipped, so one
    bad row does not refuse the valid rows of its batch; the exit status is then 1."""
    from tqdm import tqdm

    from app.schemas import ItemIn
    from app.tools.client import Client

    path = Path(args.file)
    total = count_rows(path)
    resume = Resume(path, ".loaded")
    done = 0 if args.from_start else resume.done()
    client = Client(args.url, args.api_key)
    batch: list[dict] = []
    size = None
    skipped = 0
    rows = done  # rows consumed (sent or skipped) so far

    def send() -> None:
        nonlocal size, done
        if batch:
            size = client.upsert(batch)["catalog_size"]
        bar.update(rows - done)
        done = rows
        resume.save(done)
        batch.clear()

    with tqdm(total=total, initial=done, desc="loading items", unit="item") as bar:
        for i, (line, item) in enumerate(numbered_items(path)):
            if i < done:
                continue  # confirmed by an earlier run
            rows = i + 1
            problem = refusal(ItemIn, item)
            if problem is not None:
                skipped += 1
                tqdm.write(f"{path}:{line}: skipped: {problem}", file=sys.stderr)
                continue
            batch.append(item)
            if len(batch) == args.batch:
                send()
        if rows > done:
            send()
    print("nothing left to load: every item was confirmed by an earlier run"
          if size is None and not skipped else f"catalog size: {size}")
    if skipped:
        raise InputError(f"{skipped} rows of {path} were skipped (see above); the rest "
                         "were loaded")


def _demo(args: argparse.Namespace) -> None:
    from app.tools.demo import run_demo

    run_demo(args.url, args.api_key, args.requests, args.window, args.seed,
             Path(args.png) if args.png else None)


def _import_events(args: argparse.Namespace) -> None:
    from app.tools.import_events import run

    run(Path(args.file), args.url, args.api_key, args.from_start, args.concurrency)


def _fetch_log(url: str, api_key: str | None, limit: int) -> list[dict]:
    from app.tools.client import Client

    with Client(url, api_key, timeout=120) as client:
        return client.log(limit)["records"]


def _export_log(args: argparse.Namespace) -> None:
    records = _fetch_log(args.url, args.api_key, args.limit)
    with open(args.out, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


def _ope(args: argparse.Namespace) -> None:
    from models.ope import evaluate_slate_log

    if args.log:
        with open(args.log, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    else:
        records = _fetch_log(args.url, args.api_key, args.limit)
    if not records:
        sys.exit("no logged impressions to evaluate (the log fills as reward windows close)")
    slots = sum(len(r["item_ids"]) for r in records)
    print(f"{len(records)} impressions, {slots} slot decisions; CTR per slot, 95% intervals")
    print(f"{'policy':<9} {'estimator':<6} {'CTR':>8}  interval")
    for policy, estimates in evaluate_slate_log(records).items():
        for name, est in estimates.items():
            print(f"{policy:<9} {name:<6} {est.value:>8.5f}  [{est.low:.5f}, {est.high:.5f}]")


def _client_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that calls a running service."""
    p.add_argument("--url", default=os.environ.get("RECSVC_URL", "http://127.0.0.1:8000"),
                   help="the service (RECSVC_URL)")
    p.add_argument("--api-key", default=os.environ.get("RECSVC_API_KEY"),
                   help="sent as X-API-Key (RECSVC_API_KEY)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # every option's help shows its default
        return sub.add_parser(name, help=help, description=help,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    _process_commands(command)
    _bulk_commands(command)
    _client_commands(command)
    return parser


Command = Callable[[str, str], argparse.ArgumentParser]


def _process_commands(command: Command) -> None:
    """The commands that run a process of the service."""
    p = command("serve", "run the service (embedded store unless RECSVC_REDIS_URL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another "
                   "host needs API keys, or RECSVC_ALLOW_OPEN=true)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--workers", type=_at_least_one, default=None,
                   help="processes serving on the port (default RECSVC_WORKERS, 1); more "
                   "than one needs RECSVC_REDIS_URL")
    p.set_defaults(fn=_serve)

    p = command("learner", "run the learner alone, beside RECSVC_ROLE=api replicas (needs "
                "RECSVC_REDIS_URL); --port serves its probes")
    p.add_argument("--host", default="127.0.0.1", help="address of the probes")
    p.add_argument("--port", type=int, default=8001, help="port of the probes")
    p.set_defaults(fn=_learner)


def _bulk_commands(command: Command) -> None:
    """The commands that send a file's rows to a running service, resumably."""

    def bulk(name: str, help: str, rows: str, marker: str) -> argparse.ArgumentParser:
        p = command(name, help)
        p.add_argument("file", help=f"JSONL (one object per line) or CSV ({rows})")
        p.add_argument("--from-start", action="store_true",
                       help=f"ignore <file>{marker} and send every row again")
        _client_args(p)
        return p

    p = bulk("load-items", "bulk upsert items from a JSONL or CSV file",
             "item_id,text[,tags][,available]", ".loaded")
    p.add_argument("--batch", type=int, default=500, help="items per request (at most 1000)")
    p.set_defaults(fn=_load_items)

    p = bulk("import-events", "import past interactions (oldest first) into users' "
             "histories, from a JSONL or CSV file, with a progress bar; resumable",
             "user_id,item_id,event[,value]", ".imported")
    p.add_argument("--concurrency", type=int, default=16, help="users sent at once")
    p.set_defaults(fn=_import_events)


def _client_commands(command: Command) -> None:
    """The demo, and the commands that read a service's evaluation log."""
    p = command("demo", "play simulated MovieLens-100k users against a service and "
                "print its CTR learning curve next to random and popularity peers "
                "served in the same run")
    p.add_argument("--requests", type=int, default=4000, help="recommend requests to play")
    p.add_argument("--window", type=int, default=400, help="requests per row of the curve")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated users")
    p.add_argument("--png", default="recsvc-demo.png",
                   help="where to write the curves (needs matplotlib); '' for none")
    p.add_argument("--url", default=os.environ.get("RECSVC_URL"),
                   help="a running service to use (RECSVC_URL); by default the demo "
                   "starts its own with the embedded store and a 1 s reward window")
    p.add_argument("--api-key", default=os.environ.get("RECSVC_API_KEY"),
                   help="sent as X-API-Key (RECSVC_API_KEY)")
    p.set_defaults(fn=_demo)

    p = command("export-log", "write the evaluation log (closed impressions) as JSONL")
    p.add_argument("--out", default="recsvc-log.jsonl", help="file to write")
    p.add_argument("--limit", type=int, default=100_000, help="newest records to export")
    _client_args(p)
    p.set_defaults(fn=_export_log)

    p = command("ope", "off-policy estimates (IPS, SNIPS, DR) from the log")
    p.add_argument("--log", help="a file from export-log; default: fetch from --url")
    p.add_argument("--limit", type=int, default=100_000,
                   help="newest records to fetch from --url")
    _client_args(p)
    p.set_defaults(fn=_ope)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    import httpx

    try:
        args.fn(args)
    except InputError as exc:
        parser.exit(1, f"recsvc {args.command}: {exc}\n")
    except (httpx.TransportError, ConnectionError) as exc:
        parser.exit(1, f"recsvc {args.command}: cannot reach the service at "
                       f"{getattr(args, 'url', '?')}: {exc or type(exc).__name__}\n")
    except ServiceError as exc:
        parser.exit(1, f"recsvc {args.command}: {exc}\n")


if __name__ == "__main__":
    main()
