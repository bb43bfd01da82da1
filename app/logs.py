"""Process logging: plain text for a terminal, one JSON object per line for a log
pipeline (``RECSVC_LOG_FORMAT``), each record with the id of the HTTP request it
belongs to.

The request id is the ``X-Request-ID`` a client or proxy sent (when it is a sane
token) or one made up here; it is sent back in the response's ``X-Request-ID``, so
a client's report of a failed call finds its log lines.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO

from app.ids import new_ulid

# the id of the HTTP request being handled ("-" outside one)
request_id: ContextVar[str] = ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# what a record may carry beside its message, as ``extra`` (the access log's fields)
FIELDS = ("method", "route", "path", "status", "duration_ms", "client")


def incoming_request_id(header: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is a plain token of at most 128
    characters (anything else could forge log lines), else a new id."""
    if header:
        text = header.decode("latin-1")
        if _SANE_ID.fullmatch(text):
            return text
    return new_ulid()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message,
    request_id, the access log's fields when present, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage(),
               "request_id": getattr(record, "request_id", request_id.get())}
        for name in FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def handler(fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``fmt`` (``text`` or ``json``) records, with their request id,
    to ``stream`` (stderr by default)."""
    out = logging.StreamHandler(stream)
    out.addFilter(_RequestIdFilter())
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    return out


def configure(level: str, fmt: str) -> None:
    """Root logging for a ``recsvc`` process. No record carries its caller's file and
    line, thread or process (neither format prints them): the logging HOWTO's
    "Optimization" switches, which spare every access-log line a walk up the stack."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=level.upper(), handlers=[handler(fmt)], force=True)
