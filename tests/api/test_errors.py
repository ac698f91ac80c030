"""A failure no handler expected: one 500 problem, inside the request's context (its Cloud Trace
id in the log line, `nosniff` on the answer), logged once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.logs import TRACE_KEY, CloudLoggingFormatter
from app.notify.base import Notification, Receipt
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary
from tests.servers import ThreadedServer

TRACE_ID = "105445aa7843bc8bf206b12000100000"


class BuggyNotifier:
    name = "buggy"
    max_recipients: int | None = None
    send_seconds = 1.0

    async def send(self, notification: Notification) -> Receipt:
        raise RuntimeError("a bug in a notifier")

    async def aclose(self) -> None:
        return None


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_an_unexpected_error_is_one_500_with_the_trace_and_nosniff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.setFormatter(CloudLoggingFormatter())
    settings = outbox_settings(tmp_path, google_cloud_project="demo-project")
    with ThreadedServer(settings, notifier=BuggyNotifier()) as server:
        headers, body = binary()
        answer = httpx.post(
            server.url + EVENTARC_PATH,
            headers={**headers, "X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1"},
            content=body,
            timeout=10,
        )
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.json()["detail"] == "internal error"
    assert "a bug in a notifier" not in answer.text
    lines = json_lines(caplog.text)
    failures = [line for line in lines if "exception" in line]
    assert len(failures) == 1, failures  # not a second line from the server
    [failure] = failures
    assert failure["severity"] == "ERROR"
    assert failure[TRACE_KEY] == f"projects/demo-project/traces/{TRACE_ID}"
    assert "a bug in a notifier" in failure["exception"]
    # uvicorn's own line for the same failure would be the second.
    assert not [line for line in lines if line["message"] == "Exception in ASGI application"]
