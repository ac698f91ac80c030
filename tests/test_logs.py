"""One JSON object per stdout line, the shape Cloud Logging reads from Cloud Run: `severity`,
`message`, `logging.googleapis.com/trace` from `X-Cloud-Trace-Context`, and every `extra` field.
https://cloud.google.com/logging/docs/structured-logging
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.logs import (
    TRACE_KEY,
    CloudLoggingFormatter,
    configure_logging,
    current_trace,
    trace_from_header,
)
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.servers import ThreadedServer

TRACE_ID = "105445aa7843bc8bf206b12000100000"
TRACE_HEADER = f"{TRACE_ID}/1;o=1"


def record(message: str = "notification sent", *args: object, **fields: Any) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "app.delivery.pipeline",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": message,
            "args": args,
            **fields,
        }
    )


def formatted(log_record: logging.LogRecord) -> dict[str, Any]:
    line = CloudLoggingFormatter().format(log_record)
    assert "\n" not in line
    entry: dict[str, Any] = json.loads(line)
    return entry


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_record_is_one_json_object_with_severity_message_and_time() -> None:
    log_record = record("notification %s to %d people", "sent", 2)
    entry = formatted(log_record)
    assert entry["severity"] == "INFO"
    assert entry["message"] == "notification sent to 2 people"
    assert entry["logger"] == "app.delivery.pipeline"
    time = datetime.fromisoformat(entry["time"])
    assert time.tzinfo is not None
    assert time == datetime.fromtimestamp(log_record.created, UTC)


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
def test_severity_is_a_cloud_logging_severity(level: str) -> None:
    entry = formatted(record(levelno=getattr(logging, level), levelname=level))
    assert entry["severity"] == level


def test_extra_fields_become_top_level_keys() -> None:
    entry = formatted(record(event_id="evt-1", bucket="b", object="dir/x.txt", recipients=2))
    assert entry["event_id"] == "evt-1"
    assert entry["bucket"] == "b"
    assert entry["object"] == "dir/x.txt"
    assert entry["recipients"] == 2


def test_values_json_cannot_hold_are_written_as_text() -> None:
    assert formatted(record(path=Path("/tmp/outbox/x.eml")))["path"] == "/tmp/outbox/x.eml"


def test_a_multi_line_message_stays_on_one_line() -> None:
    entry = formatted(record("first line\nsecond line\r\nthird"))
    assert entry["message"] == "first line\nsecond line\r\nthird"


def test_uvicorn_colour_copies_and_private_attributes_are_left_out() -> None:
    entry = formatted(record(color_message="\x1b[32mcoloured\x1b[0m", _private="x"))
    assert "color_message" not in entry
    assert "_private" not in entry


def test_standard_record_attributes_are_not_repeated() -> None:
    entry = formatted(record())
    assert not {"levelno", "pathname", "lineno", "args", "msg", "process"} & set(entry)


def test_an_exception_is_kept_in_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = formatted(record("unhandled error", exc_info=sys.exc_info()))
    assert "Traceback" in entry["exception"]
    assert "ValueError: boom" in entry["exception"]


def test_the_current_trace_is_added() -> None:
    token = current_trace.set("projects/demo-project/traces/abc")
    try:
        entry = formatted(record())
    finally:
        current_trace.reset(token)
    assert entry[TRACE_KEY] == "projects/demo-project/traces/abc"


def test_no_trace_outside_a_request() -> None:
    assert TRACE_KEY not in formatted(record())


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (TRACE_HEADER, TRACE_ID),
        (f"{TRACE_ID}/1", TRACE_ID),
        (TRACE_ID, TRACE_ID),
        (f" {TRACE_ID} /2;o=0", TRACE_ID),
    ],
)
def test_trace_from_header(header: str, trace_id: str) -> None:
    assert trace_from_header(header, "demo-project") == f"projects/demo-project/traces/{trace_id}"


@pytest.mark.parametrize(
    "header",
    [None, "", "/1;o=1", "not a trace/1", "../../x/1", "a" * 65, "abc\ndef/1", "trace;o=1/1"],
)
def test_malformed_trace_headers_give_no_trace(header: str | None) -> None:
    assert trace_from_header(header, "demo-project") is None


@pytest.mark.parametrize("project", [None, ""])
def test_no_trace_without_a_project(project: str | None) -> None:
    assert trace_from_header(TRACE_HEADER, project) is None


@pytest.fixture
def restore_logging() -> Iterator[None]:
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(log.handlers[:], log.level, log.propagate) for log in loggers]
    yield
    for log, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_writes_json_lines_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    logging.getLogger("app.test").info("hidden below the level")
    logging.getLogger("app.test").warning("shown", extra={"event_id": "evt-1"})
    logging.getLogger("uvicorn.error").error("from uvicorn")
    lines = json_lines(capsys.readouterr().out)
    assert [(line["severity"], line["message"]) for line in lines] == [
        ("WARNING", "shown"),
        ("ERROR", "from uvicorn"),
    ]
    assert lines[0]["event_id"] == "evt-1"


def test_log_lines_of_a_request_carry_its_cloud_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.setFormatter(CloudLoggingFormatter())
    settings = outbox_settings(tmp_path, google_cloud_project="demo-project")
    with ThreadedServer(settings) as server:
        headers, body = binary(object_data(name="traced.txt"), event_id="evt-traced")
        response = httpx.post(
            server.url + EVENTARC_PATH,
            headers={**headers, "X-Cloud-Trace-Context": TRACE_HEADER},
            content=body,
            timeout=10,
        )
        assert response.status_code == 200
        headers, body = binary(object_data(name="untraced.txt"), event_id="evt-untraced")
        assert httpx.post(server.url, headers=headers, content=body, timeout=10).is_success
    lines = json_lines(caplog.text)
    traced = [line for line in lines if line.get("event_id") == "evt-traced"]
    untraced = [line for line in lines if line.get("event_id") == "evt-untraced"]
    assert traced
    assert untraced
    expected = f"projects/demo-project/traces/{TRACE_ID}"
    assert all(line[TRACE_KEY] == expected for line in traced)
    assert all(TRACE_KEY not in line for line in untraced)
    assert all(TRACE_KEY not in line for line in lines if line["message"] == "service ready")


def test_no_trace_without_a_configured_project(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.setFormatter(CloudLoggingFormatter())
    with ThreadedServer(outbox_settings(tmp_path)) as server:
        headers, body = binary(event_id="evt-1")
        response = httpx.post(
            server.url,
            headers={**headers, "X-Cloud-Trace-Context": TRACE_HEADER},
            content=body,
            timeout=10,
        )
        assert response.status_code == 200
    lines = [line for line in json_lines(caplog.text) if line.get("event_id") == "evt-1"]
    assert lines
    assert all(TRACE_KEY not in line for line in lines)
