"""One JSON object per stdout line, the shape Cloud Logging reads from Cloud Run.

Cloud Logging lifts `severity`, `message` and `logging.googleapis.com/trace` out of each line
(https://cloud.google.com/logging/docs/structured-logging); every other key lands in `jsonPayload`.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TRACE_KEY = "logging.googleapis.com/trace"

# The trace of the request being handled, set by the middleware in app.main.
current_trace: ContextVar[str | None] = ContextVar("current_trace", default=None)

# Attributes every LogRecord has; anything else was passed through `extra=` and becomes a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def trace_from_header(header: str | None, project: str | None) -> str | None:
    """`X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS` -> `projects/P/traces/TRACE_ID`."""
    if not header or not project:
        return None
    trace_id = header.split("/", 1)[0].strip()
    if not trace_id or len(trace_id) > 64 or not trace_id.isalnum():
        return None
    return f"projects/{project}/traces/{trace_id}"


class CloudLoggingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = vars(record)
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        trace = current_trace.get()
        if trace:
            entry[TRACE_KEY] = trace
        # Whatever was passed through `extra=` becomes a field (set arithmetic: this runs for
        # every line the service writes).
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                entry[key] = fields[key]
        if record.exc_info:
            # Exceptions are ours to debug, never shown to clients; keep them in the log line.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str) -> None:
    """Route the root logger (and uvicorn's) to one JSON line per record on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
