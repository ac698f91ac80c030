"""`python -m app.emit TYPE --bucket B --name N`: send a realistic Eventarc storage event.

The local stand-in for `gsutil cp test1.txt gs://demo`: it builds the CloudEvent Eventarc would
deliver (every ce-* header, a full StorageObjectData with a fresh generation), posts it to a
running service and prints the answer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from cloudevents.core.bindings.http import HTTPMessage, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from app.events.models import EventType

DEFAULT_URL = "http://localhost:8080/?__GCP_CloudEventsMode=GCS_NOTIFICATION"


def storage_object(
    event_type: EventType, bucket: str, name: str, size: int, now: datetime
) -> dict[str, Any]:
    """A StorageObjectData as Cloud Storage publishes it: int64 fields as decimal strings."""
    generation = str(time.time_ns() // 1000)  # microseconds, like real generations
    stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    digest = hashlib.md5(f"{bucket}/{name}/{generation}".encode(), usedforsecurity=False)
    encoded = quote(name, safe="")
    data: dict[str, Any] = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/{encoded}",
        "name": name,
        "bucket": bucket,
        "generation": generation,
        "metageneration": "2" if event_type is EventType.METADATA_UPDATED else "1",
        "contentType": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "timeCreated": stamp,
        "updated": stamp,
        "storageClass": "STANDARD",
        "timeStorageClassUpdated": stamp,
        "size": str(size),
        "md5Hash": base64.b64encode(digest.digest()).decode(),
        "mediaLink": (
            f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/{encoded}"
            f"?generation={generation}&alt=media"
        ),
        "crc32c": "AAAAAA==",
        "etag": base64.b64encode(generation.encode()).decode(),
    }
    if event_type in (EventType.DELETED, EventType.ARCHIVED):
        data["timeDeleted"] = stamp
    return data


def build_event(
    event_type: EventType, bucket: str, name: str, size: int, *, structured: bool = False
) -> HTTPMessage:
    now = datetime.now(UTC)
    event = CloudEvent(
        attributes={
            "id": str(uuid.uuid4()),
            "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "type": event_type.value,
            "subject": f"objects/{name}",
            "time": now,
            "datacontenttype": "application/json",
            "bucket": bucket,
        },
        data=storage_object(event_type, bucket, name, size, now),
    )
    return to_structured_event(event) if structured else to_binary_event(event)


def post(url: str, message: HTTPMessage, timeout: float = 30) -> tuple[int, str]:
    request = urllib.request.Request(url, data=message.body, method="POST")
    for header, value in message.headers.items():
        request.add_header(header, value)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.emit", description=__doc__.split("\n")[0])
    parser.add_argument("type", choices=[member.short for member in EventType])
    parser.add_argument("--bucket", required=True, type=utf8)
    parser.add_argument("--name", required=True, type=utf8, help="object name, e.g. reports/q3.csv")
    parser.add_argument(
        "--url", default=DEFAULT_URL, type=utf8, help=f"service URL (default {DEFAULT_URL})"
    )
    parser.add_argument("--structured", action="store_true", help="structured mode, not binary")
    parser.add_argument("--size", type=int, default=1024, help="object size in bytes")
    args = parser.parse_args(argv)
    message = build_event(
        EventType.from_short(args.type),
        args.bucket,
        args.name,
        args.size,
        structured=args.structured,
    )
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
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
