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
by file and line and skipped. An event sent twice is two events, so a run cut short
remembers every row up to the first one the service did not answer, and a rerun on
a changed file (rows appended, say) or against another service refuses to guess
where to continue: ``--from-start`` sends every row again.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from app.schemas import EventIn
from app.tools.client import AsyncClient, ServiceError
from app.tools.rows import InputError, Resume, count_rows, numbered_rows, refusal

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


async def _send_chunk(client: AsyncClient, rows: list[tuple[int, dict]], concurrency: int,
                      answered: set[int]) -> list[tuple[int, str]]:
    """Send a chunk's events (each user's in order, users concurrently); return the
    ``(line, reason)`` of those the service refused. ``answered`` collects the lines the
    service answered (accepted or refused), so that a chunk cut short by a failure can
    be remembered up to its first unanswered row."""
    by_user: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line, event in rows:
        by_user[event["user_id"]].append((line, event))
    gate = asyncio.Semaphore(concurrency)
    refused: list[tuple[int, str]] = []
    failed: list[BaseException] = []

    async def one_user(events: list[tuple[int, dict]]) -> None:
        async with gate:
            for line, e in events:
                if failed:  # stop sending; what is in flight finishes and is counted
                    return
                try:
                    await client.event(e["user_id"], e["item_id"], e["event"], e.get("value"))
                except ServiceError as exc:
                    if exc.status not in (404, 422):
                        failed.append(exc)
                        return
                    refused.append((line, str(exc)))  # this row; the others go on
                except Exception as exc:  # the service is unreachable, say
                    failed.append(exc)
                    return
                answered.add(line)

    await asyncio.gather(*(one_user(events) for events in by_user.values()))
    if failed:
        raise failed[0]
    return refused


async def import_events(path: Path, url: str, api_key: str | None, from_start: bool,
                        concurrency: int) -> tuple[int, int]:
    """Import the file; return ``(events accepted, rows skipped)``."""
    if concurrency < 1:
        raise InputError(f"--concurrency must be at least 1 (got {concurrency})")
    total = count_rows(path)
    resume = Resume(path, ".imported", url, strict=True)
    done = 0 if from_start else resume.done()
    accepted = skipped = 0
    # (row index, line, event) of the rows read but not yet confirmed; a row the file
    # check skipped stays here until the rows before it are confirmed
    pending: list[tuple[int, int, dict | None]] = []
    answered: set[int] = set()

    def confirmed_prefix() -> int:
        """Rows of the file, from its start, that need not be sent again."""
        for index, line, event in pending:
            if event is not None and line not in answered:
                return index
        return pending[-1][0] + 1 if pending else done

    async with AsyncClient(url, api_key) as client:
        with tqdm(total=total, initial=done, desc="importing events", unit="event") as bar:
            async def flush() -> None:
                nonlocal accepted, skipped
                rows = [(line, event) for _, line, event in pending if event is not None]
                refused = await _send_chunk(client, rows, concurrency, answered)
                for line, reason in sorted(refused):
                    tqdm.write(f"{path}:{line}: skipped: {reason}", file=sys.stderr)
                accepted += len(rows) - len(refused)
                skipped += len(refused)
                rows_done = confirmed_prefix()
                bar.update(rows_done - bar.n)
                resume.save(rows_done)
                pending.clear()
                answered.clear()

            try:
                for i, (line, event) in enumerate(numbered_events(path)):
                    if i < done or i in resume.finished_beyond:
                        continue  # confirmed by an earlier run
                    reason = refusal(EventIn, event)
                    if reason is not None:
                        skipped += 1
                        tqdm.write(f"{path}:{line}: skipped: {reason}", file=sys.stderr)
                    pending.append((i, line, None if reason else event))
                    if len(pending) == CHUNK:
                        await flush()
                if pending:
                    await flush()
            finally:  # cut short (a failure, Ctrl-C): remember what the service answered
                if pending:
                    prefix = confirmed_prefix()
                    resume.save(prefix, {i for i, line, _ in pending if line in answered})
    return accepted, skipped


def run(path: Path, url: str, api_key: str | None, from_start: bool, concurrency: int) -> None:
    accepted, skipped = asyncio.run(import_events(path, url, api_key, from_start, concurrency))
    print(f"imported {accepted} events")
    if skipped:
        raise InputError(f"{skipped} rows of {path} were skipped (see above); the rest "
                         "were imported")
