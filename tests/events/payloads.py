"""The sample payloads under tests/events/samples/: one change (some-bucket/folder/Test.cs,
generation 1587627537231057) in every form it can arrive in, written from Google's documented
shapes. Each file holds the request's `headers` and `body` (JSON; null for an empty body)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from app.events.decode import decode_event
from app.events.models import StorageEvent, UnhandledEvent

SAMPLES = Path(__file__).parent / "samples"
GENERATION = 1587627537231057


def sample(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    return document


def request(document: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    body = b"" if document["body"] is None else json.dumps(document["body"]).encode()
    return dict(document["headers"]), body


def decoded(name: str) -> StorageEvent:
    event = decode_event(*request(sample(name)))
    assert isinstance(event, StorageEvent)
    return event


def ignored(document: dict[str, Any]) -> UnhandledEvent:
    event = decode_event(*request(document))
    assert isinstance(event, UnhandledEvent)
    return event


def encode(data: object) -> str:
    """A Pub/Sub message's data field: base64 of the JSON."""
    return base64.b64encode(json.dumps(data).encode()).decode()


def message_data(document: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(document["body"]["message"]["data"]))


def as_binary(document: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """A structured-mode sample as Eventarc sends it: attributes in ce-* headers."""
    event = dict(document["body"])
    data = event.pop("data")
    headers = {f"ce-{key}": str(value) for key, value in event.items() if key != "datacontenttype"}
    headers["content-type"] = event.get("datacontenttype", "application/json")
    return headers, json.dumps(data).encode()
