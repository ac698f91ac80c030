"""Pub/Sub pushes and 1st-gen events at the HTTP level (issue 12): the answer table of Eventarc
deliveries holds for them too. A push the service can never use is 400 with a problem+json saying
why; one it recognises but has no use for is 200 `ignored` (so Pub/Sub does not retry it for
seven days); anything over the body limit is 413 before it is parsed."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.emit import FORMS, new_change, storage_object
from app.events.models import EventType
from tests.conftest import read_outbox
from tests.servers import ThreadedServer

ATTRIBUTES = {
    "eventType": "OBJECT_FINALIZE",
    "bucketId": "some-bucket",
    "objectId": "in/a.txt",
    "objectGeneration": "1700000000000001",
    "eventTime": "2026-11-30T05:00:00.000Z",
    "payloadFormat": "JSON_API_V1",
    "notificationConfig": "projects/_/buckets/some-bucket/notificationConfigs/1",
}


def envelope(
    attributes: dict[str, str] | None = None, data: bytes | None = None, raw: str | None = None
) -> bytes:
    """A push of ATTRIBUTES and the object resource; `data` replaces the resource, `raw` the
    base64 text itself."""
    change = new_change(EventType.FINALIZED, "some-bucket", "in/a.txt", generation=1700000000000001)
    payload = json.dumps(storage_object(change)).encode() if data is None else data
    message: dict[str, Any] = {
        "attributes": ATTRIBUTES if attributes is None else attributes,
        "data": base64.b64encode(payload).decode() if raw is None else raw,
        "messageId": "9876543210123456",
        "publishTime": "2026-11-30T05:00:00.100Z",
    }
    return json.dumps({"message": message, "subscription": "projects/p/subscriptions/s"}).encode()


def post(server: ThreadedServer, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return httpx.post(
        server.url + "/",
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=10,
    )


def problem(answer: httpx.Response) -> str:
    assert answer.headers["content-type"] == "application/problem+json"
    detail: str = answer.json()["detail"]
    return detail


def test_a_push_is_sent_and_the_same_change_pushed_again_is_a_duplicate(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    assert post(outbox_server, envelope()).json()["status"] == "sent"
    assert post(outbox_server, envelope()).json()["status"] == "duplicate"
    assert len(read_outbox(tmp_path / "outbox")) == 2  # one per recipient, once


@pytest.mark.parametrize("form", ["pubsub", "pubsub-unwrapped", "messagepublished", "legacy"])
def test_a_1_mb_push_is_413_before_it_is_read(outbox_server: ThreadedServer, form: str) -> None:
    message = FORMS[form](new_change(EventType.FINALIZED, "some-bucket", "n" * 1_000_000))
    answer = httpx.post(
        outbox_server.url + "/", headers=message.headers, content=message.body, timeout=10
    )
    assert answer.status_code == 413
    assert "512 KiB" in problem(answer)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (envelope(raw="%%% not base64 %%%"), "base64"),
        (envelope(data=b"not json"), "JSON"),
        (envelope(data=b"[1, 2]"), "object"),
        (envelope({k: v for k, v in ATTRIBUTES.items() if k != "bucketId"}), "bucketId"),
        (envelope({**ATTRIBUTES, "objectId": "elsewhere.txt"}), "disagrees"),
        (json.dumps({"message": "hello"}).encode(), "message"),
        (json.dumps({"hello": "world"}).encode(), "Pub/Sub"),
    ],
    ids=[
        "bad-base64",
        "not-json",
        "a-list",
        "no-bucket",
        "disagreeing-name",
        "bad-message",
        "other",
    ],
)
def test_a_malformed_push_is_400_saying_what_is_wrong(
    outbox_server: ThreadedServer, tmp_path: Path, body: bytes, says: str
) -> None:
    answer = post(outbox_server, body)
    assert answer.status_code == 400
    assert says in problem(answer)
    assert read_outbox(tmp_path / "outbox") == []


def test_an_unwrapped_push_without_write_metadata_is_400_naming_it(
    outbox_server: ThreadedServer,
) -> None:
    change = new_change(EventType.FINALIZED, "some-bucket", "in/a.txt")
    answer = post(outbox_server, json.dumps(storage_object(change)).encode())
    assert answer.status_code == 400
    assert "write_metadata" in problem(answer)


@pytest.mark.parametrize(
    "attributes",
    [{}, {"source": "billing"}, {**ATTRIBUTES, "eventType": "OBJECT_TELEPORT"}],
    ids=["no-attributes", "another-topic", "unknown-event-type"],
)
def test_a_push_that_is_no_storage_change_is_acknowledged_and_logged(
    outbox_server: ThreadedServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    attributes: dict[str, str],
) -> None:
    with caplog.at_level(logging.WARNING):
        answer = post(outbox_server, envelope(attributes, data=b'{"invoice": 1}'))
    assert answer.status_code == 200
    assert answer.json()["status"] == "ignored"
    assert any(record.levelno == logging.WARNING for record in caplog.records)
    assert read_outbox(tmp_path / "outbox") == []


def test_a_stale_message_pushed_back_from_the_dead_letter_topic_is_kept_not_sent(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    """The README's replay of Pub/Sub's dead letters: a change older than DEDUPE_RETENTION may
    have partly gone out before its done marks expired, so it is kept, not emailed again."""
    stale = {
        **ATTRIBUTES,
        "eventTime": "2020-01-01T00:00:00.000Z",
        "CloudPubSubDeadLetterSourceSubscription": "gcs-notifier-push",
    }
    answer = post(outbox_server, envelope(stale))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "dead-lettered"
    assert not (tmp_path / "outbox").exists() or not read_outbox(tmp_path / "outbox")
    [kept] = (tmp_path / "dead-letter").glob("*.json")
    assert "older than DEDUPE_RETENTION" in json.loads(kept.read_text())["deadletterreason"]
    # A recent one from there is notified; an old one that is no replay goes the usual way.
    fresh = {**stale, "eventTime": ATTRIBUTES["eventTime"]}
    assert post(outbox_server, envelope(fresh)).json()["status"] == "sent"
    old = {**ATTRIBUTES, "eventTime": "2020-01-01T00:00:00.000Z"}
    assert post(outbox_server, envelope(old)).json()["status"] == "duplicate"
