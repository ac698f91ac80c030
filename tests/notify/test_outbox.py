"""OutboxNotifier: what SendGrid would deliver, as files. One RFC 5322 .eml file per recipient of
each notification (SendGrid gets one personalization per recipient), written atomically; a
notification is written whole or not at all, and every failure names the path and OUTBOX_DIR.

Coroutines run under `asyncio.run`, one event loop per scenario.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
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
TEAM = ("ops@example.com", "dev@example.com", "boss@example.com")


def notification(
    key: str = "change-1",
    subject: str = SUBJECT,
    recipients: tuple[str, ...] = ("ops@example.com",),
) -> Notification:
    return Notification(
        key=key,
        subject=subject,
        text="gs://démo-bucket/rapport d'été.csv was uploaded.\n",
        html="<p>gs://démo-bucket/rapport d&#x27;été.csv was uploaded.</p>\n",
        recipients=recipients,
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


def emails(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.eml"))


def blocked_names(key: str, recipient: str) -> list[str]:
    """The file names a copy may get in the next seconds: `TIME-sha256(key)-sha256(recipient)`."""
    notification_digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    recipient_digest = hashlib.sha256(recipient.encode()).hexdigest()[:8]
    now = time.time()
    return [
        f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now + offset))}"
        f"-{notification_digest}-{recipient_digest}.eml"
        for offset in range(-1, 5)
    ]


def block(directory: Path, key: str, recipient: str) -> set[str]:
    """Occupy every name the copy could get with a folder: writing it must fail."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in blocked_names(key, recipient):
        (directory / name).mkdir(exist_ok=True)
    return {path.name for path in directory.iterdir()}


def test_one_recipient_is_one_eml_file(tmp_path: Path) -> None:
    send(tmp_path / "outbox", notification())
    path, _ = the_one_message(tmp_path / "outbox")
    assert path.suffix == ".eml"


def test_each_recipient_gets_their_own_copy_with_only_their_address(tmp_path: Path) -> None:
    send(tmp_path, notification(recipients=TEAM))
    paths = emails(tmp_path)
    assert len(paths) == 3
    addressed = sorted(str(parse(path)["To"]) for path in paths)
    assert addressed == sorted(TEAM)
    for path in paths:
        message = parse(path)
        others = set(TEAM) - {str(message["To"])}
        raw = path.read_bytes().decode()
        assert not [address for address in others if address in raw]  # nobody sees the list
        assert message["Cc"] is None
        assert message["Bcc"] is None


def test_every_copy_carries_the_same_email_under_its_own_message_id(tmp_path: Path) -> None:
    [receipt] = send(tmp_path, notification(recipients=TEAM))
    messages = [parse(path) for path in emails(tmp_path)]
    assert {str(message["Subject"]) for message in messages} == {SUBJECT}
    assert {str(message["From"]) for message in messages} == {"notifier@example.com"}
    parts = set()
    for message in messages:
        text, html = message.get_body(("plain",)), message.get_body(("html",))
        assert text is not None
        assert html is not None
        parts.add((text.get_content(), html.get_content()))
    assert parts == {
        (
            "gs://démo-bucket/rapport d'été.csv was uploaded.\n",
            "<p>gs://démo-bucket/rapport d&#x27;été.csv was uploaded.</p>\n",
        )
    }
    ids = [str(message["Message-ID"]) for message in messages]
    assert len(set(ids)) == 3
    assert receipt.message_id in ids


def test_each_notification_gets_its_own_files(tmp_path: Path) -> None:
    send(
        tmp_path,
        notification("change-1", recipients=TEAM),
        notification("change-2", recipients=TEAM),
        notification("change-3"),
    )
    assert len(emails(tmp_path)) == 7


def test_the_copies_of_one_notification_sort_together(tmp_path: Path) -> None:
    send(tmp_path, notification("change-1", recipients=TEAM))
    digest = hashlib.sha256(b"change-1").hexdigest()[:16]
    assert all(path.name.split("-")[1] == digest for path in emails(tmp_path))


def test_the_outbox_folder_is_created_when_missing(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "outbox"
    send(directory, notification())
    assert len(emails(directory)) == 1


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
    assert message["To"] == "ops@example.com"
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
    send(tmp_path, notification("change-1", recipients=TEAM), notification("change-2"))
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".eml"] * 4
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


# --- failures: transient, logged, naming the path and OUTBOX_DIR -------------------------------


def test_a_folder_under_a_regular_file_is_a_transient_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outbox should be")
    with pytest.raises(TransientDeliveryError) as caught:
        send(blocker / "outbox", notification())
    assert "outbox write failed" in caught.value.reason
    assert str(blocker / "outbox") in caught.value.reason
    assert "OUTBOX_DIR" in caught.value.reason
    assert isinstance(caught.value.__cause__, OSError)


def test_an_outbox_path_that_is_a_file_names_the_path_and_the_variable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    occupied = tmp_path / "outbox"
    occupied.write_text("")
    with (
        caplog.at_level(logging.INFO, logger="app.notify.outbox"),
        pytest.raises(TransientDeliveryError) as caught,
    ):
        send(occupied, notification())
    expected = f"outbox write failed: {occupied}: not a folder (OUTBOX_DIR={occupied})"
    assert caught.value.reason == expected
    [record] = [record for record in caplog.records if record.name == "app.notify.outbox"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "outbox write failed"
    assert str(getattr(record, "path", "")).startswith(str(occupied))
    assert getattr(record, "variable", None) == "OUTBOX_DIR"
    assert getattr(record, "event_id", None) == "evt-1"
    assert getattr(record, "reason", None)


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    blocked = block(tmp_path, "change-1", "ops@example.com")
    with pytest.raises(TransientDeliveryError):
        send(tmp_path, notification("change-1"))
    assert {path.name for path in tmp_path.iterdir()} == blocked


def test_a_failed_second_copy_fails_the_notification_and_leaves_no_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SendGrid accepts a request's personalizations together or not at all: so does the outbox.
    blocked = block(tmp_path, "change-1", TEAM[1])
    with (
        caplog.at_level(logging.ERROR, logger="app.notify.outbox"),
        pytest.raises(TransientDeliveryError) as caught,
    ):
        send(tmp_path, notification("change-1", recipients=TEAM))
    failed_path = str(getattr(caplog.records[-1], "path", ""))
    assert failed_path.removeprefix(f"{tmp_path}/") in blocked
    assert failed_path in caught.value.reason
    assert {path.name for path in tmp_path.iterdir()} == blocked  # the first copy was removed


def test_the_redelivery_after_a_partial_failure_writes_each_copy_once(tmp_path: Path) -> None:
    blocked = block(tmp_path, "change-1", TEAM[1])
    with pytest.raises(TransientDeliveryError):
        send(tmp_path, notification("change-1", recipients=TEAM))
    for name in blocked:
        (tmp_path / name).rmdir()
    send(tmp_path, notification("change-1", recipients=TEAM))
    assert sorted(str(parse(path)["To"]) for path in emails(tmp_path)) == sorted(TEAM)


def test_on_written_is_told_the_paths_of_every_copy_once_they_exist(tmp_path: Path) -> None:
    told: list[list[Path]] = []

    def on_written(paths: list[Path]) -> None:
        assert all(path.is_file() for path in paths)  # written before the listener hears
        told.append(paths)

    async def scenario() -> None:
        notifier = OutboxNotifier(tmp_path, on_written=on_written)
        await notifier.send(notification("change-1", recipients=TEAM))
        await notifier.send(notification("change-2"))

    asyncio.run(scenario())
    assert [len(paths) for paths in told] == [3, 1]
    assert sorted(path for paths in told for path in paths) == emails(tmp_path)


def test_on_written_is_not_called_when_the_write_fails(tmp_path: Path) -> None:
    told: list[list[Path]] = []
    block(tmp_path, "change-1", TEAM[1])

    async def scenario() -> None:
        await OutboxNotifier(tmp_path, on_written=told.append).send(
            notification("change-1", recipients=TEAM)
        )

    with pytest.raises(TransientDeliveryError):
        asyncio.run(scenario())
    assert told == []


def test_a_failing_listener_is_logged_and_the_send_still_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def on_written(_: list[Path]) -> None:
        raise RuntimeError("listener bug")

    async def scenario() -> Receipt:
        return await OutboxNotifier(tmp_path, on_written=on_written).send(notification())

    with caplog.at_level(logging.ERROR, logger="app.notify.outbox"):
        receipt = asyncio.run(scenario())
    assert receipt.message_id is not None
    assert len(emails(tmp_path)) == 1
    assert [record.message for record in caplog.records] == ["outbox listener failed"]


def test_the_route_that_sent_it_is_a_header(tmp_path: Path) -> None:
    routed = Notification(
        key="change-1",
        subject="s",
        text="t",
        html="<p>h</p>",
        recipients=("ops@example.com",),
        sender="notifier@example.com",
        context={"event_id": "evt-1", "route": "finance-reports"},
    )
    send(tmp_path, routed)
    _, message = the_one_message(tmp_path)
    assert message["X-Gcs-Notifier-Route"] == "finance-reports"


def test_an_email_sent_without_rules_has_no_route_header(tmp_path: Path) -> None:
    send(tmp_path, notification())
    _, message = the_one_message(tmp_path)
    assert "X-Gcs-Notifier-Route" not in message
