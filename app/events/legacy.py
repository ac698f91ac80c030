"""1st-gen Cloud Functions background events about Cloud Storage -> StorageEvent.

Two shapes occur: `{"context": {"eventId", "timestamp", "eventType", "resource"}, "data": {...}}`
and the flat `{"eventId", "timestamp", "eventType", "resource", "data"}`. The data is the object
resource. Event types: `google.storage.object.finalize|delete|archive|metadataUpdate`, and the
older `providers/cloud.storage/eventTypes/object.change`, which is a deletion when
`data.resourceState` is `not_exists` and otherwise a new object. `resource` is a string or an
object with a `name`: `projects/P/buckets/B/objects/NAME`, the older events with `#GENERATION`
appended to NAME. Unlike functions-framework's conversion, any project id is read (not only
`_`), a string resource as well as an object, and the `#GENERATION` suffix is not left in the name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app.events.change import (
    check_agrees,
    clip,
    excerpt,
    kind_of,
    object_data,
    required_text,
    storage_event,
    text,
    timestamp,
)
from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent, UnhandledEvent

EVENT_TYPES = {
    "google.storage.object.finalize": EventType.FINALIZED,
    "google.storage.object.delete": EventType.DELETED,
    "google.storage.object.archive": EventType.ARCHIVED,
    "google.storage.object.metadataUpdate": EventType.METADATA_UPDATED,
}
OBJECT_CHANGE = "providers/cloud.storage/eventTypes/object.change"
_RESOURCE = re.compile(r"projects/[^/]+/buckets/([^/]+)/objects/(.+)", re.DOTALL)
_GENERATION_SUFFIX = re.compile(r"(.+)#([0-9]{1,19})", re.DOTALL)
_FLAT_KEYS = ("eventId", "eventType", "resource")


def is_background_event(document: Mapping[str, Any]) -> bool:
    return "context" in document or any(key in document for key in _FLAT_KEYS)


def from_background_event(document: Mapping[str, Any]) -> StorageEvent | UnhandledEvent:
    if "context" in document:
        context = document["context"]
        if not isinstance(context, dict):
            raise EventDecodeError(f"context must be an object, not {kind_of(context)}")
        where = "context."
    else:
        context, where = document, ""
    event_id = required_text(context, "eventId", where)
    event_name = required_text(context, "eventType", where)
    event_type = EVENT_TYPES.get(event_name)
    if event_type is None and event_name != OBJECT_CHANGE:
        return UnhandledEvent(id=event_id, source=_source(context), type=clip(event_name))
    resource = _resource_name(context.get("resource"), f"{where}resource")
    document_data = document.get("data")
    if not isinstance(document_data, dict):
        raise EventDecodeError(
            "data is missing: a storage event carries the object resource"
            if document_data is None
            else f"data must be an object (the object resource), not {kind_of(document_data)}"
        )
    if event_type is None:
        # object.change: one type for every change, told apart by the object's state.
        deleted = document_data.get("resourceState") == "not_exists"
        event_type = EventType.DELETED if deleted else EventType.FINALIZED
    bucket, name, generation = _object(resource, document_data.get("name"), f"{where}resource")
    data = dict(document_data)
    data.setdefault("bucket", bucket)
    data.setdefault("name", name)
    if generation is not None:
        data.setdefault("generation", generation)
    object_data_ = object_data(data, "data")
    check_agrees(object_data_, "data", bucket, name, generation, f"{where}resource")
    time = timestamp(text(context, "timestamp", where), f"{where}timestamp")
    return storage_event(event_type, event_id, time, object_data_, {})


def _source(context: Mapping[str, Any]) -> str:
    resource = context.get("resource")
    if isinstance(resource, dict):
        resource = resource.get("name")
    return clip(resource) if isinstance(resource, str) and resource else "unknown"


def _resource_name(resource: object, where: str) -> str:
    if isinstance(resource, dict):
        resource = resource.get("name")
        where = f"{where}.name"
    if not isinstance(resource, str) or not resource:
        raise EventDecodeError(
            f"{where} is missing"
            if resource is None
            else f"{where} must be a non-empty string, not {excerpt(resource, 40)}"
        )
    return resource


def _object(resource: str, data_name: object, where: str) -> tuple[str, str, int | None]:
    """projects/P/buckets/B/objects/NAME[#GENERATION] -> (B, NAME, GENERATION)."""
    match = _RESOURCE.fullmatch(resource)
    if match is None:
        raise EventDecodeError(
            f"{where} is not projects/PROJECT/buckets/BUCKET/objects/NAME: {excerpt(resource)}"
        )
    bucket, name = match.groups()
    suffix = _GENERATION_SUFFIX.fullmatch(name)
    if suffix is None or data_name == name:
        # An object's name may itself end in '#' and digits; the data says which it is.
        return bucket, name, None
    stripped, generation = suffix.groups()
    return bucket, stripped, int(generation)
