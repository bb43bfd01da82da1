"""Reading a user's JSONL or CSV file row by row for the bulk commands (``load-items``,
``import-events``), and remembering how far a run got so a rerun continues there.

Every problem with the file is an ``InputError`` that names the file and the line, so
the CLI says it in one line instead of a traceback."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic loads only when a row is checked: the CLI starts fast
    from pydantic import BaseModel


class InputError(Exception):
    """A problem with what the user gave a command, said in one line, not a traceback."""


def count_rows(path: Path) -> int:
    """Rows of data in the file (non-blank lines, less a CSV's header), for progress."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip()) - (path.suffix.lower() == ".csv")


def numbered_rows(path: Path, columns: Sequence[str],
                  from_csv: Callable[[dict[str, str]], dict]) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` from JSONL (one object per line) or CSV (a header that
    has at least ``columns``; ``from_csv`` turns a row into the object). A line that is
    not a JSON object, or a CSV header without the columns, is an ``InputError``."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: the CSV header has no {' or '.join(missing)} column "
                                 f"(it has: {', '.join(reader.fieldnames or []) or 'nothing'})")
            for row in reader:
                yield reader.line_num, from_csv(row)
        return
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not JSON ({exc.msg}, column {exc.colno})"
                                 ) from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: not a JSON object")
            yield n, obj


def refusal(schema: type[BaseModel], row: dict) -> str | None:
    """Why the service would refuse ``row`` as a ``schema`` body (API.md's rules, the
    same first error it would answer), or None."""
    from pydantic import ValidationError

    from app.schemas import first_error

    try:
        schema.model_validate(row)
    except ValidationError as exc:
        return first_error(exc.errors())
    return None


class Resume:
    """How many rows of a file earlier runs finished, kept beside it (``<file><suffix>``)
    with the file's size and mtime and the service it went to.

    Not strict (``load-items``: an upsert sent twice changes nothing), a changed file
    or another service starts over. Strict (``import-events``: an event sent twice is
    two events), either is an ``InputError`` that says to choose: ``--from-start``
    sends every row again."""

    def __init__(self, path: Path, suffix: str, url: str = "", strict: bool = False) -> None:
        self.path = path
        self.marker = path.with_name(path.name + suffix)
        stat = path.stat()
        self.fingerprint = {"size": stat.st_size, "mtime": stat.st_mtime, "url": url}
        self.strict = strict
        self.finished_beyond: set[int] = set()  # read by done()

    def done(self) -> int:
        """Rows, from the file's start, that earlier runs finished."""
        if not self.marker.exists():
            return 0
        saved = json.loads(self.marker.read_text())
        if {k: saved.get(k, "") for k in self.fingerprint} == self.fingerprint:
            self.finished_beyond = set(saved.get("beyond", []))
            return int(saved["done"])
        if not self.strict:
            return 0
        where = ("another service (" + str(saved.get("url")) + ")"
                 if saved.get("url", "") != self.fingerprint["url"] else "this service")
        raise InputError(f"{self.path}: an earlier run sent its first {saved['done']} rows to "
                         f"{where}, and the file or the service differs now; rerun with "
                         f"--from-start to send every row again (or remove {self.marker})")

    def save(self, done: int, beyond: Iterable[int] = ()) -> None:
        """``done`` rows from the start are finished, and so are the rows ``beyond``
        (indices past ``done``: a run cut short while rows were sent concurrently),
        with those an earlier run finished past ``done``."""
        beyond = {i for i in (*beyond, *self.finished_beyond) if i >= done}
        self.marker.write_text(json.dumps({**self.fingerprint, "done": done,
                                           "beyond": sorted(beyond)}))
