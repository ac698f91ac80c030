"""`python -m app` as Cloud Run runs it: what it refuses at start-up, what it says when it starts,
how it stops with sends in flight, and the limit on request heads."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import EVENTARC_PATH, binary
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.servers import ServiceProcess

API_KEY = "SG.never-show-me.0123456789abcdef"


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def refusal(tmp_path: Path, **env: str) -> str:
    """Start the service with `env`; it must exit non-zero quickly. Returns what it printed."""
    output = ServiceProcess({"IDEMPOTENCY_STORE": "memory", **env}, tmp_path).refused()
    assert API_KEY not in output
    return output


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_sqlite_store_in_a_folder_that_cannot_exist_stops_start_up(tmp_path: Path) -> None:
    output = refusal(tmp_path, IDEMPOTENCY_STORE="sqlite:////proc/nonexistent/x/n.db")
    assert "IDEMPOTENCY_STORE" in output
    assert "/proc/nonexistent/x/n.db" in output


def test_a_file_that_is_not_a_database_stops_start_up(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_bytes(b"these are my notes, not a database\n" * 100)
    output = refusal(tmp_path, IDEMPOTENCY_STORE=f"sqlite:///{not_a_db}")
    assert "IDEMPOTENCY_STORE" in output
    assert "not a database" in output


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:abc/0", "port"),
        ("sqlite:///", "path"),
        ("redis:///0", "host"),
        ("redis://127.0.0.1:6379/zero", "database"),
        ("postgres://db/x", "sqlite:///PATH"),
    ],
)
def test_a_store_url_that_cannot_work_stops_start_up(tmp_path: Path, url: str, says: str) -> None:
    output = refusal(tmp_path, IDEMPOTENCY_STORE=url)
    assert "IDEMPOTENCY_STORE" in output
    assert says in output


def test_an_outbox_dir_that_is_a_file_stops_start_up(tmp_path: Path) -> None:
    a_file = tmp_path / "outbox"
    a_file.write_text("not a folder")
    output = refusal(tmp_path, NOTIFIER="outbox", OUTBOX_DIR=str(a_file))
    assert "OUTBOX_DIR" in output
    assert str(a_file) in output


def test_an_unwritable_dead_letter_dir_stops_start_up(tmp_path: Path) -> None:
    # Permission bits do not stop root (CI runs as root): a folder inside a file cannot exist.
    a_file = tmp_path / "file"
    a_file.write_text("x")
    output = refusal(tmp_path, DEAD_LETTER_DIR=str(a_file / "dead-letter"))
    assert "DEAD_LETTER_DIR" in output
    assert str(a_file / "dead-letter") in output


def test_sendgrid_without_a_key_stops_start_up_instead_of_falling_back(tmp_path: Path) -> None:
    output = refusal(
        tmp_path, NOTIFIER="sendgrid", NOTIFY_TO="a@example.com", NOTIFY_FROM="n@example.com"
    )
    assert "SENDGRID_API_KEY" in output


def test_a_key_with_a_line_break_inside_stops_start_up(tmp_path: Path) -> None:
    output = refusal(
        tmp_path,
        SENDGRID_API_KEY="SG.first-half\r\nX-Injected: yes",
        NOTIFY_TO="a@example.com",
        NOTIFY_FROM="n@example.com",
    )
    assert "SENDGRID_API_KEY" in output
    assert "X-Injected" not in output


def test_every_invalid_variable_is_reported_at_once(tmp_path: Path) -> None:
    output = refusal(
        tmp_path,
        PORT="eighty",
        EVENT_AUTH="oidc",
        NOTIFIER="sendgrid",
        SENDGRID_TIMEOUT="-1",
        IDEMPOTENCY_STORE="redis://h:abc/0",
    )
    for variable in ("PORT", "EVENT_INVOKERS", "SENDGRID_API_KEY", "SENDGRID_TIMEOUT"):
        assert variable in output
    assert "IDEMPOTENCY_STORE" in output


def test_start_up_says_in_one_line_what_it_runs_with(fake: FakeSendGrid, tmp_path: Path) -> None:
    env = {
        "NOTIFIER": "SendGrid",  # enum values are case-insensitive
        "SENDGRID_API_KEY": fake.api_key + "\n",  # as `echo "$KEY" | gcloud secrets create`
        "SENDGRID_HOST": fake.url,
        "NOTIFY_TO": "a@example.com,b@example.com",
        "NOTIFY_FROM": "n@example.com",
        "EVENT_AUTH": "NONE",
        "IDEMPOTENCY_STORE": "redis://:hunter2@127.0.0.1:6399/0",  # nobody there
    }
    service = ServiceProcess(env, tmp_path).start(wait=False)
    try:
        # Not ready (its store cannot be reached), but serving: its first lines are written.
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(service.url + "/healthz", timeout=10).status_code == 503
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, service.output()
                time.sleep(0.05)
    finally:
        service.stop()
    lines = [line for line in json_lines(service.output()) if line["message"] == "service started"]
    assert len(lines) == 1
    [line] = lines
    assert line["notifier"] == "sendgrid"
    assert line["sendgrid_host"] == fake.url
    assert line["event_auth"] == "none"
    assert line["recipients"] == 2
    assert line["store"] == "redis://127.0.0.1:6399/0"
    assert "hunter2" not in service.output()
    assert fake.api_key not in service.output()


def test_a_trailing_newline_in_the_key_is_stripped_and_events_are_sent(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    env = {
        "SENDGRID_API_KEY": fake.api_key + "\n",
        "SENDGRID_HOST": fake.url,
        "NOTIFY_TO": "a@example.com",
        "NOTIFY_FROM": "n@example.com",
        "IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/state/n.db",
    }
    with ServiceProcess(env, tmp_path) as service:
        answer = httpx.post(service.url + EVENTARC_PATH, headers=binary()[0], content=binary()[1])
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "sent"
    assert len(fake.accepted()) == 1
    assert not (tmp_path / "dead-letter").exists() or not list((tmp_path / "dead-letter").iterdir())


def test_sigterm_cuts_a_send_that_would_outlast_the_grace_period(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    """SENDGRID_TIMEOUT (20 s here) outlasts the 8 s grace: the send is cut a second before and
    the event answered 503 (Eventarc delivers again), one WARNING, no ERROR. SendGrid may have
    taken the request, so the claim is not released: it ends with its lease."""
    fake.script(Reply.hang(seconds=30.0))
    env = {
        "SENDGRID_API_KEY": fake.api_key,
        "SENDGRID_HOST": fake.url,
        "SENDGRID_TIMEOUT": "20",
        "NOTIFY_TO": "a@example.com",
        "NOTIFY_FROM": "n@example.com",
    }
    with ServiceProcess(env, tmp_path) as service:
        answers: list[httpx.Response] = []
        headers, body = binary()
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(service.url + EVENTARC_PATH, headers=headers, content=body, timeout=30)
            )
        )
        sender.start()
        assert fake.wait_for_requests(1, timeout=10)
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        sender.join(timeout=20)
        assert service.wait(timeout=15) in (0, -signal.SIGTERM)
        waited = time.monotonic() - signalled
        output = service.output()
    [answer] = answers
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert "Retry-After" in answer.headers
    assert "shutting down" in answer.json()["detail"]
    assert waited < 9.5  # inside Cloud Run's 10 s before SIGKILL
    lines = json_lines(output)
    assert not [line for line in lines if line["severity"] in ("ERROR", "CRITICAL")], output
    assert "Traceback" not in output
    warnings = [line for line in lines if line["severity"] == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["message"] == (
        "notification may or may not have been sent; its claim stands until its lease ends,"
        " then a redelivery may send it"
    )


def test_a_request_head_over_the_limit_gets_431_and_the_connection_closes(
    tmp_path: Path,
) -> None:
    with ServiceProcess({"IDEMPOTENCY_STORE": "memory"}, tmp_path) as service:
        for size in (100_000, 5_000_000):
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
                # The server may close before the client has written it all.
                with contextlib.suppress(OSError):
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size)
                answer = sock.recv(200)
            assert answer.startswith(b"HTTP/1.1 431 ")
        # A head within the limit is served.
        ok = httpx.get(service.url + "/healthz", headers={"X-Fine": "a" * 30_000})
        assert ok.status_code == 200


def test_python_m_app_starts_from_the_factory_with_an_existing_database(tmp_path: Path) -> None:
    database = tmp_path / "state" / "n.db"
    database.parent.mkdir()
    sqlite3.connect(database).close()  # an empty database is fine
    with ServiceProcess({"IDEMPOTENCY_STORE": f"sqlite:///{database}"}, tmp_path) as service:
        assert httpx.head(service.url + "/healthz").status_code == 200
