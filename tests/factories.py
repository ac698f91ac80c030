"""Realistic Eventarc deliveries for tests: what Cloud Storage publishes, built by hand.

The shapes follow Google's StorageObjectData samples and the functions-framework conformance
payloads: int64 fields as decimal strings, millisecond timestamps, `ce-*` headers in binary mode.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any
from urllib.parse import quote

from app.events.models import EventType

_generations = itertools.count(1587627537231057)
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' "%')

EVENTARC_PATH = "/?__GCP_CloudEventsMode=GCS_NOTIFICATION"


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
) -> dict[str, str]:
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "type": str(event_type),
        "subject": f"objects/{name}",
        "time": "2020-09-29T11:32:00.123Z",
        "bucket": bucket,
    }


def binary(
    data: dict[str, Any] | None = None,
    event_type: EventType | str = EventType.FINALIZED,
    event_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode delivery, as Eventarc sends it."""
    data = object_data() if data is None else data
    attrs = attributes(event_type, data.get("bucket", "b"), data.get("name", "n"), event_id)
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
