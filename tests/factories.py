"""Realistic Eventarc deliveries for tests: what Cloud Storage publishes, built by hand.

The shapes follow Google's StorageObjectData samples and the functions-framework conformance
payloads: int64 fields as decimal strings, millisecond timestamps, `ce-*` headers in binary mode.
"""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from app.digests.window import DigestItem
from app.events.models import EventType

_generations = itertools.count(1587627537231057)
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' "%')

EVENTARC_PATH = "/?__GCP_CloudEventsMode=GCS_NOTIFICATION"


def recent(seconds_ago: float = 60) -> str:
    """An event time `seconds_ago`, with milliseconds, as Eventarc writes it (a replay of a change
    older than DEDUPE_RETENTION is refused)."""
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def object_data(
    bucket: str = "some-bucket", name: str = "folder/Test.cs", **overrides: Any
) -> dict[str, Any]:
    generation = str(next(_generations))
    data: dict[str, Any] = {
        "bucket": bucket,
        "contentType": "text/plain",
        "crc32c": "rTVTeQ==",
        "etag": "CNHZkbuF/ugCEAE=",
        "generation": generation,
        "id": f"{bucket}/{name}/{generation}",
        "kind": "storage#object",
        "md5Hash": "kF8MuJ5+CTJxvyhHS1xzRg==",
        "mediaLink": f"https://www.googleapis.com/download/storage/v1/b/{bucket}/o/x?alt=media",
        "metageneration": "1",
        "name": name,
        "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/x",
        "size": "352",
        "storageClass": "MULTI_REGIONAL",
        "timeCreated": "2020-04-23T07:38:57.230Z",
        "timeStorageClassUpdated": "2020-04-23T07:38:57.230Z",
        "updated": "2020-04-23T07:38:57.230Z",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def attributes(
    event_type: EventType | str = EventType.FINALIZED,
    bucket: str = "some-bucket",
    name: str = "folder/Test.cs",
    event_id: str | None = None,
    time: str = "2020-09-29T11:32:00.123Z",
) -> dict[str, str]:
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "type": str(event_type),
        "subject": f"objects/{name}",
        "time": time,
        "bucket": bucket,
    }


def binary(
    data: dict[str, Any] | None = None,
    event_type: EventType | str = EventType.FINALIZED,
    event_id: str | None = None,
    time: str = "2020-09-29T11:32:00.123Z",
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode delivery, as Eventarc sends it."""
    data = object_data() if data is None else data
    attrs = attributes(event_type, data.get("bucket", "b"), data.get("name", "n"), event_id, time)
    # CloudEvents HTTP binding 3.1.3.2: header values are percent-encoded beyond printable ASCII,
    # and space, '"' and '%' are encoded too.
    headers = {f"ce-{key}": quote(value, safe=_HEADER_SAFE) for key, value in attrs.items()}
    headers["content-type"] = "application/json"
    return headers, json.dumps(data).encode()


def structured(
    data: dict[str, Any] | None = None,
    event_type: EventType | str = EventType.FINALIZED,
    event_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    data = object_data() if data is None else data
    document: dict[str, Any] = attributes(
        event_type, data.get("bucket", "b"), data.get("name", "n"), event_id
    )
    document["datacontenttype"] = "application/json"
    document["data"] = data
    return {"content-type": "application/cloudevents+json"}, json.dumps(document).encode()


def bulk_item(n: int, start: datetime) -> DigestItem:
    """The n-th event of a bulk upload, as a digest window holds it (a DigestItem): mostly one
    bucket and folder, every type, sizes, times from `start` rising with gaps and out of order by
    a few milliseconds, some without a time or a size; from the 40,000th on, every 1,000th in a
    second bucket and another folder, first seen long after the events a digest lists
    (tests/stores/test_firestore_windows.py, bench/firestore_window.py)."""
    kinds = list(EventType)
    late = n >= 40_000 and n % 1000 == 0
    return DigestItem(
        change_key=f"bulk-{n}",
        event_type=kinds[n % 7 % len(kinds)],
        bucket="archive" if late else "uploads",
        name=f"bulk/{'2025' if late else '2024'}/part-{n:06d}.csv",
        size=None if n % 13 == 0 else 1_000_000 + n,
        time=None if n % 17 == 0 else start + timedelta(milliseconds=n * 3 - (n % 5) * 7),
        content_type="text/csv",
    )
