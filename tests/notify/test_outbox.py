"""OutboxNotifier: one RFC 5322 .eml file per notification, written atomically.

Coroutines run under `asyncio.run`, one event loop per scenario.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from app.notify.base import Notification, Receipt, TransientDeliveryError
from app.notify.outbox import OutboxNotifier

SUBJECT = "[gs://démo-bucket] finalized: rapport d'été 日本語.csv"


def notification(key: str = "change-1", subject: str = SUBJECT) -> Notification:
    return Notification(
        key=key,
        subject=subject,
        text="gs://démo-bucket/rapport d'été.csv was uploaded.\n",
        html="<p>gs://démo-bucket/rapport d&#x27;été.csv was uploaded.</p>\n",
        recipients=("ops@example.com", "dev@example.com"),
        sender="notifier@example.com",
        context={"event_id": "evt-1"},
    )


def send(directory: Path, *notifications: Notification) -> list[Receipt]:
    async def scenario() -> list[Receipt]:
        notifier = OutboxNotifier(directory)
        try:
            return [await notifier.send(item) for item in notifications]
        finally:
            await notifier.aclose()

    return asyncio.run(scenario())


def parse(path: Path) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def the_one_message(directory: Path) -> tuple[Path, EmailMessage]:
    [path] = list(directory.iterdir())
    return path, parse(path)


def test_one_notification_is_one_eml_file(tmp_path: Path) -> None:
    send(tmp_path / "outbox", notification())
    path, _ = the_one_message(tmp_path / "outbox")
    assert path.suffix == ".eml"


def test_each_notification_gets_its_own_file(tmp_path: Path) -> None:
    send(tmp_path, notification("change-1"), notification("change-2"), notification("change-3"))
    assert len(list(tmp_path.glob("*.eml"))) == 3


def test_the_outbox_folder_is_created_when_missing(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "outbox"
    send(directory, notification())
    assert len(list(directory.glob("*.eml"))) == 1


def test_message_is_multipart_alternative_with_text_then_html(tmp_path: Path) -> None:
    send(tmp_path, notification())
    _, message = the_one_message(tmp_path)
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    assert isinstance(parts[0], EmailMessage)
    assert isinstance(parts[1], EmailMessage)
    assert parts[0].get_content() == "gs://démo-bucket/rapport d'été.csv was uploaded.\n"
    assert "rapport d&#x27;été.csv" in parts[1].get_content()


def test_message_has_the_rfc_5322_headers(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    [receipt] = send(tmp_path, notification())
    after = datetime.now(UTC)
    _, message = the_one_message(tmp_path)
    assert message["From"] == "notifier@example.com"
    assert message["To"] == "ops@example.com, dev@example.com"
    assert message["Subject"] == SUBJECT
    date = parsedate_to_datetime(str(message["Date"]))
    assert before <= date <= after + timedelta(seconds=1)
    message_id = str(message["Message-ID"])
    assert message_id.startswith("<")
    assert message_id.endswith(">")
    assert "@" in message_id
    assert receipt == Receipt(notifier="outbox", message_id=message_id)


def test_message_ids_are_unique(tmp_path: Path) -> None:
    receipts = send(tmp_path, notification("change-1"), notification("change-2"))
    assert receipts[0].message_id != receipts[1].message_id


def test_non_ascii_subject_is_encoded_and_round_trips(tmp_path: Path) -> None:
    send(tmp_path, notification())
    path, message = the_one_message(tmp_path)
    raw = path.read_bytes()
    headers = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    assert headers.isascii()  # RFC 5322 headers: non-ASCII travels as RFC 2047 encoded words
    assert message["Subject"] == SUBJECT


def test_long_subject_is_folded_and_round_trips(tmp_path: Path) -> None:
    subject = "[gs://b] finalized: " + "verylongname-" * 14 + "…"
    send(tmp_path, notification(subject=subject))
    path, message = the_one_message(tmp_path)
    assert all(len(line) <= 998 for line in path.read_bytes().splitlines())
    assert message["Subject"] == subject


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    send(tmp_path, notification("change-1"), notification("change-2"))
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".eml", ".eml"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_a_folder_under_a_regular_file_is_a_transient_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outbox should be")
    with pytest.raises(TransientDeliveryError) as caught:
        send(blocker / "outbox", notification())
    assert "outbox write failed" in caught.value.reason
    assert isinstance(caught.value.__cause__, OSError)


def test_an_outbox_path_that_is_a_file_is_a_transient_error(tmp_path: Path) -> None:
    occupied = tmp_path / "outbox"
    occupied.write_text("")
    with pytest.raises(TransientDeliveryError):
        send(occupied, notification())


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    # Occupy the final file name (time stamp + key digest) with folders: the rename must fail.
    digest = hashlib.sha256(b"change-1").hexdigest()[:16]
    now = time.time()
    for offset in range(-1, 5):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + offset))
        (tmp_path / f"{stamp}-{digest}.eml").mkdir(exist_ok=True)
    blocked = {path.name for path in tmp_path.iterdir()}
    with pytest.raises(TransientDeliveryError):
        send(tmp_path, notification("change-1"))
    assert {path.name for path in tmp_path.iterdir()} == blocked
