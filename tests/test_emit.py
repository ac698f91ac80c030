"""`python -m app.emit` against `python -m app` with its defaults, as the README walks through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.events.models import EventType
from tests.conftest import read_outbox
from tests.servers import ROOT, ServiceProcess


@pytest.fixture
def default_service(tmp_path: Path) -> ServiceProcess:
    # No notifier settings at all: the outbox in ./outbox and SQLite in ./state, as `make run`.
    return ServiceProcess({}, tmp_path)


def emit(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "app.emit",
            *args,
            "--url",
            f"{url}/?__GCP_CloudEventsMode=GCS_NOTIFICATION",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("structured", [False, True], ids=["binary", "structured"])
def test_emit_finalized_leaves_one_eml_naming_bucket_object_id_and_type(
    default_service: ServiceProcess, tmp_path: Path, structured: bool
) -> None:
    with default_service as service:
        flags = ["--structured"] if structured else []
        result = emit(service.url, "finalized", "--bucket", "demo", "--name", "test1.txt", *flags)
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.partition(" ")
    assert status == "200"
    assert '"status":"sent"' in body
    event_id = body.split('"id":"')[1].split('"')[0]
    [message] = read_outbox(tmp_path / "outbox")
    assert message["Subject"] == "[gs://demo] finalized: test1.txt"
    content = message.as_string()
    for expected in ("demo", "test1.txt", event_id, EventType.FINALIZED.value):
        assert expected in content


def test_emit_every_type_gives_one_email_each(
    default_service: ServiceProcess, tmp_path: Path
) -> None:
    with default_service as service:
        for event_type in EventType:
            assert (
                emit(
                    service.url, event_type.short, "--bucket", "demo", "--name", "a.txt"
                ).returncode
                == 0
            )
    subjects = sorted(str(message["Subject"]) for message in read_outbox(tmp_path / "outbox"))
    assert subjects == sorted(f"[gs://demo] {event_type.short}: a.txt" for event_type in EventType)


def test_emit_without_a_service_says_so(tmp_path: Path) -> None:
    result = emit("http://127.0.0.1:9", "finalized", "--bucket", "demo", "--name", "x")
    assert result.returncode == 2
    assert "could not reach" in result.stderr
    assert "Traceback" not in result.stderr


def emit_bytes(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """The command as a shell runs it with `--name $'\\xff'`: arguments are bytes, not text."""
    return subprocess.run(
        [sys.executable, "-m", "app.emit", *args, "--url", "http://127.0.0.1:9/"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("option", ["--name", "--bucket"])
@pytest.mark.parametrize("raw", [b"\xff", b"report-\xe9t\xe9.csv", b"a\xed\xa0\x80b"])
def test_emit_refuses_bytes_that_are_not_utf8_without_a_traceback(option: str, raw: bytes) -> None:
    values = {"--name": b"test1.txt", "--bucket": b"demo", option: raw}
    result = emit_bytes("finalized", "--bucket", values["--bucket"], "--name", values["--name"])
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    assert f"argument {option}: not valid UTF-8 text: {raw!r}" in stderr
    assert result.stdout == b""


def test_emit_takes_non_ascii_utf8_names() -> None:
    result = emit_bytes("finalized", "--bucket", "demo", "--name", "rapport d'été.csv".encode())
    assert result.returncode == 2  # past the argument check, on to the (absent) service
    assert b"could not reach http://127.0.0.1:9/" in result.stderr
