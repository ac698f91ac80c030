"""`python -m app.emit TYPE --bucket B --name N`: send a storage change as Google would deliver it.

The local stand-in for `gsutil cp test1.txt gs://demo`: it builds what Google would deliver for one
change to one object (a full object resource with a fresh generation, or the one given with
`--generation` to resend the same change), in the chosen form (`--as`), posts it to a running
service and prints the answer.

Each form has one small pure builder, `Change -> HTTPMessage`, so tests and the bench reuse them:
- `eventarc` / `structured`: Eventarc's direct Cloud Storage trigger, a CloudEvent in binary mode
  (what Eventarc sends) or structured mode.
- `pubsub`: a Pub/Sub push of a Cloud Storage notification (payload format JSON_API_V1).
- `pubsub-unwrapped`: the same push with payload unwrapping (`no_wrapper`, `write_metadata`).
- `messagepublished`: the push envelope inside an Eventarc Pub/Sub trigger's CloudEvent.
- `legacy` / `legacy-flat`: a 1st-gen background function event, with and without `context`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import mimetypes
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

from cloudevents.core.bindings.http import HTTPMessage, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from app.events.models import EventType

DEFAULT_URL = "http://localhost:8080/?__GCP_CloudEventsMode=GCS_NOTIFICATION"
PROJECT = "local-project"
TOPIC = f"projects/{PROJECT}/topics/storage-notifications"
SUBSCRIPTION = f"projects/{PROJECT}/subscriptions/storage-notifier-push"
# Eventarc creates and names the subscription behind a Pub/Sub trigger itself.
EVENTARC_SUBSCRIPTION = f"projects/{PROJECT}/subscriptions/eventarc-us-central1-notifier-sub-000"
PUSH_USER_AGENT = "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)"
MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"

# Cloud Storage Pub/Sub notifications name the four changes in their `eventType` attribute,
# 1st-gen background functions in `eventType` too, each in its own words.
PUBSUB_EVENT_TYPES = {
    EventType.FINALIZED: "OBJECT_FINALIZE",
    EventType.DELETED: "OBJECT_DELETE",
    EventType.ARCHIVED: "OBJECT_ARCHIVE",
    EventType.METADATA_UPDATED: "OBJECT_METADATA_UPDATE",
}
LEGACY_EVENT_TYPES = {
    EventType.FINALIZED: "google.storage.object.finalize",
    EventType.DELETED: "google.storage.object.delete",
    EventType.ARCHIVED: "google.storage.object.archive",
    EventType.METADATA_UPDATED: "google.storage.object.metadataUpdate",
}
MAX_GENERATION = 2**63 - 1  # an int64, like every generation Cloud Storage hands out


@dataclass(frozen=True)
class Change:
    """One change to one object, and the id of the one message that reports it."""

    type: EventType
    bucket: str
    name: str
    generation: int
    size: int
    time: datetime
    message_id: str

    @property
    def metageneration(self) -> str:
        return "2" if self.type is EventType.METADATA_UPDATED else "1"


def new_change(
    event_type: EventType,
    bucket: str,
    name: str,
    size: int = 1024,
    *,
    generation: int | None = None,
) -> Change:
    """A change happening now, in a fresh generation unless one is given, with a fresh message id
    (Pub/Sub message ids are decimal numbers; Eventarc reuses them as CloudEvent ids)."""
    now = datetime.now(UTC)
    return Change(
        type=event_type,
        bucket=bucket,
        name=name,
        generation=time.time_ns() // 1000 if generation is None else generation,
        size=size,
        time=now.replace(microsecond=now.microsecond // 1000 * 1000),  # Pub/Sub's precision
        message_id=str(random.randrange(10**15, 10**16)),
    )


def _stamp(moment: datetime, timespec: str = "milliseconds") -> str:
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def storage_object(change: Change) -> dict[str, Any]:
    """The object resource (JSON API v1, StorageObjectData): int64 fields as decimal strings."""
    bucket, name, generation = change.bucket, change.name, str(change.generation)
    stamp = _stamp(change.time)
    digest = hashlib.md5(f"{bucket}/{name}/{generation}".encode(), usedforsecurity=False)
    encoded = quote(name, safe="")
    data: dict[str, Any] = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/{encoded}",
        "name": name,
        "bucket": bucket,
        "generation": generation,
        "metageneration": change.metageneration,
        "contentType": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "timeCreated": stamp,
        "updated": stamp,
        "storageClass": "STANDARD",
        "timeStorageClassUpdated": stamp,
        "size": str(change.size),
        "md5Hash": base64.b64encode(digest.digest()).decode(),
        "mediaLink": (
            f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/{encoded}"
            f"?generation={generation}&alt=media"
        ),
        "crc32c": "AAAAAA==",
        "etag": base64.b64encode(generation.encode()).decode(),
    }
    if change.type in (EventType.DELETED, EventType.ARCHIVED):
        data["timeDeleted"] = stamp
    return data


def _storage_cloud_event(change: Change) -> CloudEvent:
    return CloudEvent(
        attributes={
            "id": change.message_id,
            "source": f"//storage.googleapis.com/projects/_/buckets/{change.bucket}",
            "type": change.type.value,
            "subject": f"objects/{change.name}",
            "time": change.time,
            "datacontenttype": "application/json",
            "bucket": change.bucket,
        },
        data=storage_object(change),
    )


def eventarc_binary(change: Change) -> HTTPMessage:
    """Eventarc's Cloud Storage trigger: a CloudEvent in binary mode (`ce-*` headers)."""
    return to_binary_event(_storage_cloud_event(change))


def eventarc_structured(change: Change) -> HTTPMessage:
    """The same CloudEvent in structured mode (`application/cloudevents+json`)."""
    return to_structured_event(_storage_cloud_event(change))


def notification_attributes(change: Change) -> dict[str, str]:
    """The attributes Cloud Storage puts on a Pub/Sub notification (payload format JSON_API_V1).
    `overwroteGeneration` / `overwrittenByGeneration` appear only when a write replaces a live
    object, which a single emitted change never does."""
    return {
        "bucketId": change.bucket,
        "eventTime": _stamp(change.time, "microseconds"),
        "eventType": PUBSUB_EVENT_TYPES[change.type],
        "notificationConfig": f"projects/_/buckets/{change.bucket}/notificationConfigs/1",
        "objectGeneration": str(change.generation),
        "objectId": change.name,
        "payloadFormat": "JSON_API_V1",
    }


def _notification_data(change: Change) -> bytes:
    return json.dumps(storage_object(change), indent=2, ensure_ascii=False).encode()


def push_envelope(change: Change, subscription: str = SUBSCRIPTION) -> dict[str, Any]:
    """A Pub/Sub push request body: the message (data in base64) and the subscription. Pub/Sub
    writes the message id and publish time in both camelCase and snake_case."""
    published = _stamp(change.time)
    return {
        "message": {
            "attributes": notification_attributes(change),
            "data": base64.b64encode(_notification_data(change)).decode(),
            "messageId": change.message_id,
            "message_id": change.message_id,
            "publishTime": published,
            "publish_time": published,
        },
        "subscription": subscription,
    }


def _json_message(
    document: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> HTTPMessage:
    return HTTPMessage(
        headers={"Content-Type": "application/json", **(headers or {})},
        body=json.dumps(document, ensure_ascii=False).encode(),
    )


def pubsub_push(change: Change) -> HTTPMessage:
    """A Pub/Sub push subscription delivering a Cloud Storage notification, wrapped."""
    return _json_message(push_envelope(change), {"User-Agent": PUSH_USER_AGENT})


def pubsub_unwrapped(change: Change) -> HTTPMessage:
    """A push subscription with payload unwrapping and write_metadata: the body is the message
    data itself (the object resource), each attribute an HTTP header of its own name, and the
    message's metadata in `x-goog-pubsub-*` headers."""
    return HTTPMessage(
        headers={
            "Content-Type": "application/json",
            "User-Agent": PUSH_USER_AGENT,
            **notification_attributes(change),
            "x-goog-pubsub-message-id": change.message_id,
            "x-goog-pubsub-publish-time": _stamp(change.time),
            "x-goog-pubsub-subscription-name": SUBSCRIPTION,
        },
        body=_notification_data(change),
    )


def message_published(change: Change) -> HTTPMessage:
    """An Eventarc Pub/Sub trigger on the notification topic: a binary-mode CloudEvent whose data
    is the push envelope, with the message id and publish time as its id and time."""
    event = CloudEvent(
        attributes={
            "id": change.message_id,
            "source": f"//pubsub.googleapis.com/{TOPIC}",
            "type": MESSAGE_PUBLISHED,
            "time": change.time,
            "datacontenttype": "application/json",
        },
        data=push_envelope(change, EVENTARC_SUBSCRIPTION),
    )
    return to_binary_event(event)


def _legacy_resource_name(change: Change) -> str:
    return f"projects/_/buckets/{change.bucket}/objects/{change.name}"


def legacy_event(change: Change) -> HTTPMessage:
    """A 1st-gen background function event (as the functions-framework conformance suite has it):
    `context` with the event's id, time, type and resource, `data` the object resource."""
    return _json_message(
        {
            "context": {
                "eventId": change.message_id,
                "timestamp": _stamp(change.time),
                "eventType": LEGACY_EVENT_TYPES[change.type],
                "resource": {
                    "service": "storage.googleapis.com",
                    "name": _legacy_resource_name(change),
                    "type": "storage#object",
                },
            },
            "data": storage_object(change),
        }
    )


def legacy_flat_event(change: Change) -> HTTPMessage:
    """The older flat background event: the context's fields at the top, the resource as a
    string."""
    return _json_message(
        {
            "eventId": change.message_id,
            "timestamp": _stamp(change.time),
            "eventType": LEGACY_EVENT_TYPES[change.type],
            "resource": _legacy_resource_name(change),
            "data": storage_object(change),
        }
    )


FORMS: dict[str, Callable[[Change], HTTPMessage]] = {
    "eventarc": eventarc_binary,
    "structured": eventarc_structured,
    "pubsub": pubsub_push,
    "pubsub-unwrapped": pubsub_unwrapped,
    "messagepublished": message_published,
    "legacy": legacy_event,
    "legacy-flat": legacy_flat_event,
}


def build_event(
    event_type: EventType,
    bucket: str,
    name: str,
    size: int,
    *,
    structured: bool = False,
    form: str = "eventarc",
    generation: int | None = None,
) -> HTTPMessage:
    change = new_change(event_type, bucket, name, size, generation=generation)
    return FORMS["structured" if structured else form](change)


def post(url: str, message: HTTPMessage, timeout: float = 30) -> tuple[int, str]:
    request = urllib.request.Request(url, data=message.body, method="POST")
    for header, value in message.headers.items():
        # Header values go out as UTF-8 bytes (an unwrapped push carries the object name in a
        # header); http.client would otherwise insist on Latin-1.
        request.add_header(header, cast(str, value.encode()))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def utf8(value: str) -> str:
    """An argument that must be text. Python reads command-line bytes that are not UTF-8 as lone
    surrogates (PEP 383), which no JSON body or header can carry; Cloud Storage names are UTF-8."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {os.fsencode(value)!r}") from None
    return value


def generation_number(value: str) -> int:
    """A generation as Cloud Storage writes it: a positive int64 in decimal digits."""
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_GENERATION:
        raise argparse.ArgumentTypeError(
            f"not a generation: {value!r} (a whole number from 1 to {MAX_GENERATION})"
        )
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.emit", description=__doc__.split("\n")[0])
    parser.add_argument("type", choices=[member.short for member in EventType])
    parser.add_argument("--bucket", required=True, type=utf8)
    parser.add_argument("--name", required=True, type=utf8, help="object name, e.g. reports/q3.csv")
    parser.add_argument(
        "--url", default=DEFAULT_URL, type=utf8, help=f"service URL (default {DEFAULT_URL})"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--as",
        dest="form",
        choices=list(FORMS),
        default="eventarc",
        help="how the change arrives (default eventarc: a binary-mode CloudEvent)",
    )
    form.add_argument(
        "--structured",
        dest="form",
        action="store_const",
        const="structured",
        help="the same as --as structured",
    )
    parser.add_argument("--size", type=int, default=1024, help="object size in bytes")
    parser.add_argument(
        "--generation",
        type=generation_number,
        help="the object's generation, to resend the same change (default: a fresh one)",
    )
    args = parser.parse_args(argv)
    change = new_change(
        EventType.from_short(args.type),
        args.bucket,
        args.name,
        args.size,
        generation=args.generation,
    )
    message = FORMS[args.form](change)
    try:
        status, body = post(args.url, message)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        print(
            f"could not reach {args.url}: {reason} (is the service running? `make run`)",
            file=sys.stderr,
        )
        return 2
    print(f"{status} {body}")
    print(
        f"generation {change.generation} (--generation {change.generation} resends it)",
        file=sys.stderr,
    )
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
