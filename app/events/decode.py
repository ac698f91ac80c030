"""HTTP request -> StorageEvent, whichever way the storage change arrived.

CloudEvents first, on the headers alone, because Eventarc carries the load. CloudEvents HTTP
binding 1.0: binary mode carries attributes in `ce-*` headers and the data in the body (what
Eventarc sends); structured mode carries the whole event as `application/cloudevents+json`; the
CloudEvents SDK does the protocol binding. Eventarc's Pub/Sub trigger (messagePublished) and
the Pub/Sub pushes are read in `app.events.pubsub`, 1st-gen background events in
`app.events.legacy`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from cloudevents.core.exceptions import BaseCloudEventException
from dateutil.parser import isoparse

from app.events import legacy, pubsub
from app.events.change import SURROGATE_ESCAPE, object_data, refuse_lone_surrogates
from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent, UnhandledEvent

__all__ = ["EventDecodeError", "decode_event"]

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_JSON = re.compile(r"^(application|text)/([a-zA-Z0-9\-.]+\+)?json\s*(;.*)?$", re.IGNORECASE)
_REQUIRED = ("specversion", "id", "source", "type")
_CORE_ATTRIBUTES = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema"}
)
NOT_RECOGNISED = (
    "not a CloudEvent, Pub/Sub push or 1st-gen event: expected ce-* headers (binary mode), "
    f"Content-Type {STRUCTURED} (structured mode), a Pub/Sub push body "
    '{"message": {...}, "subscription": ...}, an unwrapped Pub/Sub push with its '
    'x-goog-pubsub-* headers, or a background event {"context": {...}, "data": {...}}'
)
NO_ATTRIBUTE_HEADERS = (
    "a Cloud Storage object without its notification attributes: an unwrapped Pub/Sub push "
    "subscription must enable write_metadata, so that eventType, bucketId and objectId arrive "
    "as headers"
)


def decode_event(headers: Mapping[str, str], body: bytes) -> StorageEvent | UnhandledEvent:
    lowered = {name.lower(): value for name, value in headers.items()}
    content_type = lowered.get("content-type", "").split(";", 1)[0].strip().lower()
    binary = any(name.startswith("ce-") for name in lowered)
    if not binary and content_type not in (STRUCTURED, BATCH):
        return _decode_other(lowered, body)
    cloud_event = _parse_cloud_event(lowered, content_type, binary, body)
    attributes = cloud_event.get_attributes()
    if SURROGATE_ESCAPE.search(body):
        shown = {str(name): str(value) for name, value in attributes.items()}
        refuse_lone_surrogates([shown, cloud_event.get_data()])
    event_type = str(attributes["type"])
    try:
        known_type = EventType(event_type)
    except ValueError:
        if event_type == pubsub.MESSAGE_PUBLISHED:
            return pubsub.from_message_published(
                str(attributes["id"]), str(attributes["source"]), cloud_event.get_data()
            )
        return UnhandledEvent(
            id=str(attributes["id"]), source=str(attributes["source"]), type=event_type
        )
    return _storage_event(known_type, attributes, cloud_event.get_data())


def _decode_other(headers: Mapping[str, str], body: bytes) -> StorageEvent | UnhandledEvent:
    """Not a CloudEvent: a Pub/Sub push (wrapped or not) or a 1st-gen background event."""
    if pubsub.has_storage_headers(headers):
        return pubsub.from_unwrapped(headers, body)
    try:
        document = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        document = None
    if isinstance(document, dict):
        if SURROGATE_ESCAPE.search(body):
            refuse_lone_surrogates(document)
        if "message" in document:
            return pubsub.from_push(document)
        if legacy.is_background_event(document):
            return legacy.from_background_event(document)
    if pubsub.is_unwrapped(headers):
        return pubsub.ignored_unwrapped(headers)
    if isinstance(document, dict) and (
        document.get("kind") == "storage#object" or ("bucket" in document and "name" in document)
    ):
        raise EventDecodeError(NO_ATTRIBUTE_HEADERS)
    raise EventDecodeError(NOT_RECOGNISED)


def _parse_cloud_event(
    lowered: dict[str, str], content_type: str, binary: bool, body: bytes
) -> BaseCloudEvent:
    if content_type == BATCH:
        raise EventDecodeError("batched CloudEvents are not supported; send one event per request")
    if binary:
        _check_binary_body(lowered, body)
        missing = [f"ce-{name}" for name in _REQUIRED if not lowered.get(f"ce-{name}")]
        if missing:
            raise EventDecodeError(f"missing required CloudEvent headers: {', '.join(missing)}")
    else:
        _check_structured(body)
    try:
        return from_http_event(HTTPMessage(headers=lowered, body=body))
    except UnicodeDecodeError:
        raise EventDecodeError("not a valid CloudEvent: the body is not UTF-8") from None
    except json.JSONDecodeError:
        raise EventDecodeError("not a valid CloudEvent: the body is not valid JSON") from None
    except RecursionError:
        raise EventDecodeError("not a valid CloudEvent: the JSON is nested too deeply") from None
    except (BaseCloudEventException, ValueError, TypeError, AttributeError, OverflowError) as error:
        # The SDK raises its own errors for bad attributes, and dateutil's for a time it cannot
        # read. The sender must fix the request; say which attribute where we can tell.
        if not _readable_time(lowered.get("ce-time") if binary else _structured_time(body)):
            raise EventDecodeError(
                "not a valid CloudEvent: the time attribute is not an RFC 3339 timestamp"
            ) from None
        raise EventDecodeError(f"not a valid CloudEvent: {_short(error)}") from None


def _check_binary_body(headers: Mapping[str, str], body: bytes) -> None:
    """The SDK quietly hands back text for a JSON body it cannot parse; refuse it with a reason.
    Only a body that does not start like a JSON object is parsed twice, to tell why."""
    if not body.strip() or body.lstrip()[:1] == b"{":
        return
    if not _JSON.match(headers.get("content-type", "application/json")):
        return  # the data content type check names the problem
    try:
        json.loads(body)
    except UnicodeDecodeError:
        raise EventDecodeError("event data is not UTF-8 JSON") from None
    except (ValueError, RecursionError):
        raise EventDecodeError("event data is not valid JSON") from None


def _check_structured(body: bytes) -> None:
    """The SDK fills in a missing id and specversion of a structured event and fails obscurely
    on a body that is not an object, so check those first (structured mode only: Eventarc
    itself sends binary mode)."""
    try:
        document = json.loads(body)
    except UnicodeDecodeError:
        raise EventDecodeError("not a valid CloudEvent: the body is not UTF-8") from None
    except ValueError:
        raise EventDecodeError("not a valid CloudEvent: the body is not valid JSON") from None
    except RecursionError:
        raise EventDecodeError("not a valid CloudEvent: the JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise EventDecodeError("a structured-mode CloudEvent must be a JSON object")
    missing = [name for name in _REQUIRED if not document.get(name)]
    if missing:
        raise EventDecodeError(f"missing required CloudEvent attributes: {', '.join(missing)}")


def _structured_time(body: bytes) -> object:
    try:
        return json.loads(body).get("time")
    except (ValueError, RecursionError, AttributeError):
        return None


def _readable_time(value: object) -> bool:
    if value is None:
        return True
    try:
        isoparse(unquote(str(value)))
    except (ValueError, OverflowError):
        return False
    return True


def _storage_event(
    event_type: EventType, attributes: Mapping[str, Any], data: object
) -> StorageEvent:
    content_type = attributes.get("datacontenttype")
    if content_type is not None and not _JSON.match(str(content_type)):
        raise EventDecodeError(
            f"event data must be application/json, not {str(content_type)[:80]!r}"
        )
    if isinstance(data, bytes):
        raise EventDecodeError("event data is not UTF-8 JSON")
    if isinstance(data, str) and data.lstrip().startswith("{"):
        # Only text that failed to parse comes back from the SDK looking like an object.
        raise EventDecodeError("event data is not valid JSON")
    if isinstance(data, str):
        raise EventDecodeError("event data is not a JSON object (Cloud Storage StorageObjectData)")
    if not isinstance(data, dict):
        raise EventDecodeError(
            "event data must be a JSON object (Cloud Storage StorageObjectData)"
            if data is not None
            else "event has no data; Cloud Storage events carry a StorageObjectData object"
        )
    time = attributes.get("time")
    return StorageEvent(
        id=str(attributes["id"]),
        source=str(attributes["source"]),
        type=event_type,
        specversion=str(attributes["specversion"]),
        subject=_optional_str(attributes.get("subject")),
        time=time if isinstance(time, datetime) else None,
        datacontenttype=_optional_str(content_type),
        extensions={
            name: str(value)
            for name, value in attributes.items()
            if name not in _CORE_ATTRIBUTES and value is not None
        },
        data=object_data(data, "data", "event data"),
    )


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _short(error: Exception) -> str:
    text = str(error) or type(error).__name__
    # Messages from json and dateutil can quote the input; keep them short and on one line.
    return " ".join(text.split())[:200]
