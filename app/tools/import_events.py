"""``recsvc import-events FILE``: past interactions into users' histories.

A team that switches to recsvc has months of clicks, purchases and ratings. Imported
through ``POST /v1/events``, each becomes part of its user's history, so the first
request of a returning user is already personal: the state's pools, the affinity,
tag and profile features and the related-items candidates all read that history.
(Events are not Q-learning transitions: they were not chosen by the policy and carry
no propensity, so the Q-network learns from live traffic only.)

The file is JSONL (``{"user_id", "item_id", "event", "value"?}`` per line) or CSV
(``user_id,item_id,event[,value]``), oldest first. One user's events are sent in file
order, one at a time; users are sent concurrently. Resumable like ``load-items``: the
rows confirmed so far are kept in ``<file>.imported``, so a rerun continues after them.
A row the service would refuse (a bad field, an item not in the catalog) is reported
by file and line and skipped.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from app.tools.client import AsyncClient, ServiceError
from app.tools.rows import InputError, Resume, count_rows, numbered_rows

CHUNK = 1000  # rows confirmed (and remembered) together


def numbered_events(path: Path):
    """``(line number, event)`` from JSONL or CSV (user_id,item_id,event[,value])."""
    def event_of(row: dict[str, str]) -> dict:
        event: dict = {"user_id": row["user_id"], "item_id": row["item_id"],
                       "event": row["event"]}
        if (row.get("value") or "").strip():
            try:
                event["value"] = float(row["value"])
            except ValueError:
                event["value"] = row["value"]  # refused, with its line, by the schema
        return event

    return numbered_rows(path, ("user_id", "item_id", "event"), event_of)


def problem(event: dict) -> str | None:
    """Why the service would refuse this event (API.md's rules), or None."""
    from pydantic import ValidationError

    from app.schemas import EventIn, first_error

    try:
        EventIn.model_validate(event)
    except ValidationError as exc:
        return first_error(exc.errors())
    return None


async def _send_chunk(client: AsyncClient, rows: list[tuple[int, dict]],
                      concurrency: int) -> list[tuple[int, str]]:
    """Send a chunk's events (each user's in order, users concurrently); return the
    ``(line, reason)`` of those the service refused."""
    by_user: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line, event in rows:
        by_user[event["user_id"]].append((line, event))
    gate = asyncio.Semaphore(concurrency)
    refused: list[tuple[int, str]] = []

    async def one_user(events: list[tuple[int, dict]]) -> None:
        async with gate:
            for line, e in events:
                try:
                    await client.event(e["user_id"], e["item_id"], e["event"], e.get("value"))
                except ServiceError as exc:
                    if exc.status in (404, 422):  # this row; the others go on
                        refused.append((line, str(exc)))
                    else:
                        raise

    await asyncio.gather(*(one_user(events) for events in by_user.values()))
    return refused


async def import_events(path: Path, url: str, api_key: str | None, from_start: bool,
                        concurrency: int) -> tuple[int, int]:
    """Import the file; return ``(events accepted, rows skipped)``."""
    total = count_rows(path)
    resume = Resume(path, ".imported")
    done = 0 if from_start else resume.done()
    accepted = skipped = 0
    chunk: list[tuple[int, dict]] = []
    async with AsyncClient(url, api_key) as client:
        with tqdm(total=total, initial=done, desc="importing events", unit="event") as bar:
            async def flush(rows_done: int) -> None:
                nonlocal accepted, skipped
                refused = await _send_chunk(client, chunk, concurrency)
                for line, reason in sorted(refused):
                    tqdm.write(f"{path}:{line}: skipped: {reason}", file=sys.stderr)
                accepted += len(chunk) - len(refused)
                skipped += len(refused)
                bar.update(rows_done - bar.n)
                resume.save(rows_done)
                chunk.clear()

            rows = done
            for i, (line, event) in enumerate(numbered_events(path)):
                if i < done:
                    continue  # confirmed by an earlier run
                rows = i + 1
                reason = problem(event)
                if reason is not None:
                    skipped += 1
                    tqdm.write(f"{path}:{line}: skipped: {reason}", file=sys.stderr)
                    continue
                chunk.append((line, event))
                if len(chunk) == CHUNK:
                    await flush(rows)
            if rows > bar.n:
                await flush(rows)
    return accepted, skipped


def run(path: Path, url: str, api_key: str | None, from_start: bool, concurrency: int) -> None:
    accepted, skipped = asyncio.run(import_events(path, url, api_key, from_start, concurrency))
    print(f"imported {accepted} events")
    if skipped:
        raise InputError(f"{skipped} rows of {path} were skipped (see above); the rest "
                         "were imported")
