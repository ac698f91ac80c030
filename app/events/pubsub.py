"""Cloud Storage Pub/Sub notifications -> StorageEvent, however Pub/Sub hands them over.

Cloud Storage publishes one message per change, with the attributes `eventType`
(OBJECT_FINALIZE, OBJECT_DELETE, OBJECT_ARCHIVE, OBJECT_METADATA_UPDATE), `bucketId`,
`objectId`, `objectGeneration`, `eventTime`, `payloadFormat` (JSON_API_V1: the data is the
object resource; NONE: no data), `notificationConfig`, and on overwrites `overwroteGeneration` /
`overwrittenByGeneration` (https://cloud.google.com/storage/docs/pubsub-notifications).
Three envelopes carry such a message:
- a push request, `{"message": {"attributes", "data" (base64), "messageId", "publishTime"},
  "subscription"}`; the message keys also occur in snake_case (`message_id`, `publish_time`);
- an unwrapped push (`no_wrapper` with `write_metadata`): the body is the data itself, the
  attributes arrive as headers and the message's metadata as `x-goog-pubsub-*` headers
  (https://cloud.google.com/pubsub/docs/payload-unwrapping);
- Eventarc's Pub/Sub trigger: a CloudEvent `google.cloud.pubsub.topic.v1.messagePublished`
  from `//pubsub.googleapis.com/projects/P/topics/T` whose data is `{message, subscription}`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.events.change import (
    check_agrees,
    clip,
    generation,
    json_object,
    kind_of,
    object_data,
    required_text,
    storage_event,
    text,
    timestamp,
)
from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent, UnhandledEvent

MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
EVENT_TYPES = {
    "OBJECT_FINALIZE": EventType.FINALIZED,
    "OBJECT_DELETE": EventType.DELETED,
    "OBJECT_ARCHIVE": EventType.ARCHIVED,
    "OBJECT_METADATA_UPDATE": EventType.METADATA_UPDATED,
}
ATTRIBUTES = (
    "eventType",
    "bucketId",
    "objectId",
    "objectGeneration",
    "eventTime",
    "payloadFormat",
    "notificationConfig",
    "overwroteGeneration",
    "overwrittenByGeneration",
)
# Kept on the event as CloudEvent extensions (lower-case names, string values). Pub/Sub adds
# the last one to a message it forwards to a dead-letter topic
# (https://cloud.google.com/pubsub/docs/handling-failures): pushed from there, it is a replay.
DEAD_LETTER_SOURCE = "CloudPubSubDeadLetterSourceSubscription"
_EXTENSIONS = (
    "notificationConfig",
    "overwroteGeneration",
    "overwrittenByGeneration",
    DEAD_LETTER_SOURCE,
)
# An unwrapped push writes each attribute as a header; HTTP servers lower-case header names.
_HEADERS = {name.lower(): name for name in ATTRIBUTES}
_STORAGE_HEADERS = ("eventtype", "bucketid", "objectid", "payloadformat")
MESSAGE_ID_HEADER = "x-goog-pubsub-message-id"
PUBLISH_TIME_HEADER = "x-goog-pubsub-publish-time"
SUBSCRIPTION_HEADER = "x-goog-pubsub-subscription-name"


@dataclass(frozen=True, slots=True)
class Message:
    """What this service reads of one Pub/Sub message, whichever envelope it came in."""

    id: str
    publish_time: str | None
    attributes: Mapping[str, str]
    data: bytes  # empty when the message has none
    subscription: str | None
    source: str  # where it came from, to name an ignored message in the log
    where: str  # where the sender put each attribute, for error messages: "message.attributes."
    attributes_name: str  # and all of them: "message.attributes"
    data_where: str


def has_storage_headers(headers: Mapping[str, str]) -> bool:
    """Lower-cased request headers that carry Cloud Storage notification attributes."""
    return any(name in headers for name in _STORAGE_HEADERS)


def is_unwrapped(headers: Mapping[str, str]) -> bool:
    return MESSAGE_ID_HEADER in headers


def from_push(document: Mapping[str, Any]) -> StorageEvent | UnhandledEvent:
    """A push request's JSON body, `{"message": {...}, "subscription": "..."}`."""
    return decode(_wrapped(document, None, "pubsub"))


def from_message_published(
    event_id: str, source: str, data: object
) -> StorageEvent | UnhandledEvent:
    """The data of Eventarc's messagePublished CloudEvent: the same `{message, subscription}`."""
    if not isinstance(data, dict):
        raise EventDecodeError(
            f"{MESSAGE_PUBLISHED} data must be a JSON object with the Pub/Sub message, "
            f"not {kind_of(data)}"
        )
    return decode(_wrapped(data, event_id, source))


def from_unwrapped(headers: Mapping[str, str], body: bytes) -> StorageEvent | UnhandledEvent:
    """An unwrapped push with write_metadata: `headers` lower-cased, `body` the message data."""
    message_id = headers.get(MESSAGE_ID_HEADER)
    if not message_id:
        raise EventDecodeError(
            f"a Pub/Sub push with attribute headers but no {MESSAGE_ID_HEADER} header: "
            "an unwrapped push subscription must enable write_metadata"
        )
    subscription = headers.get(SUBSCRIPTION_HEADER)
    return decode(
        Message(
            id=message_id,
            publish_time=headers.get(PUBLISH_TIME_HEADER),
            attributes={
                name: _header_text(headers[header])
                for header, name in _HEADERS.items()
                if header in headers
            },
            data=body,
            subscription=subscription,
            source=subscription or "pubsub",
            where="header ",
            attributes_name="the attribute headers",
            data_where="body",
        )
    )


def ignored_unwrapped(headers: Mapping[str, str]) -> UnhandledEvent:
    """An unwrapped push without storage attribute headers: another topic's message."""
    subscription = headers.get(SUBSCRIPTION_HEADER)
    return UnhandledEvent(
        id=headers.get(MESSAGE_ID_HEADER) or "unknown",
        source=subscription or "pubsub",
        type=MESSAGE_PUBLISHED,
    )


def decode(message: Message) -> StorageEvent | UnhandledEvent:
    attributes, where = message.attributes, message.where
    event_name = text(attributes, "eventType", where)
    if event_name is None and "bucketId" not in attributes:
        # Not a Cloud Storage notification: acknowledge it, or Pub/Sub retries it for 7 days.
        return UnhandledEvent(id=message.id, source=message.source, type=MESSAGE_PUBLISHED)
    if not event_name:
        raise EventDecodeError(f"{where}eventType is {'empty' if event_name == '' else 'missing'}")
    event_type = EVENT_TYPES.get(event_name)
    if event_type is None:
        return UnhandledEvent(
            id=message.id, source=message.source, type=f"pubsub:{clip(event_name)}"
        )
    bucket = required_text(attributes, "bucketId", where)
    name = required_text(attributes, "objectId", where)
    object_generation = generation(
        text(attributes, "objectGeneration", where), f"{where}objectGeneration"
    )
    payload_format = text(attributes, "payloadFormat", where)
    if payload_format is None:
        payload_format = "JSON_API_V1" if message.data else "NONE"
    if payload_format == "JSON_API_V1":
        if not message.data:
            raise EventDecodeError(
                f"{where}payloadFormat is JSON_API_V1 but the message has no data"
            )
        document = json_object(message.data, message.data_where)
        # The object resource always names its object; fill in only what it leaves out.
        document.setdefault("bucket", bucket)
        document.setdefault("name", name)
        data = object_data(document, message.data_where)
        check_agrees(
            data, message.data_where, bucket, name, object_generation, message.attributes_name
        )
    elif payload_format == "NONE":
        # Only what the attributes say: no size, content type or metadata.
        data = object_data(
            {
                "bucket": bucket,
                "name": name,
                "generation": object_generation,
                # Each new generation starts at metageneration 1, so a finalize is always 1.
                "metageneration": 1 if event_type is EventType.FINALIZED else None,
            },
            message.attributes_name,
        )
    else:
        return UnhandledEvent(
            id=message.id,
            source=message.source,
            type=f"pubsub:{event_name} payloadFormat {clip(payload_format)}",
        )
    time = timestamp(text(attributes, "eventTime", where), f"{where}eventTime") or timestamp(
        message.publish_time, "publishTime"
    )
    extensions = {"payloadformat": payload_format}
    for attribute in _EXTENSIONS:
        value = text(attributes, attribute, where)
        if value is not None:
            extensions[attribute.lower()] = value
    if message.subscription is not None:
        extensions["subscription"] = message.subscription
    return storage_event(event_type, message.id, time, data, extensions)


def _wrapped(document: Mapping[str, Any], fallback_id: str | None, source: str) -> Message:
    message = document.get("message")
    if not isinstance(message, dict):
        raise EventDecodeError(
            "Pub/Sub push: message must be an object"
            if message is not None
            else "Pub/Sub push: message is missing"
        )
    subscription = text(document, "subscription", "")
    attributes = message.get("attributes")
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise EventDecodeError(f"message.attributes must be an object, not {kind_of(attributes)}")
    for key, value in attributes.items():
        if not isinstance(value, str):
            raise EventDecodeError(
                f"message.attributes.{clip(key, 40)} must be a string, not {kind_of(value)}"
            )
    message_id = _first_text(message, "messageId", "message_id") or fallback_id
    if message_id is None:
        raise EventDecodeError("message.messageId is missing")
    return Message(
        id=message_id,
        publish_time=_first_text(message, "publishTime", "publish_time"),
        attributes=attributes,
        data=_base64(message.get("data")),
        subscription=subscription,
        source=subscription or source,
        where="message.attributes.",
        attributes_name="message.attributes",
        data_where="message.data",
    )


def _first_text(message: Mapping[str, Any], camel: str, snake: str) -> str | None:
    """Pub/Sub writes camelCase, some relays snake_case, Eventarc both."""
    value = text(message, camel, "message.") or text(message, snake, "message.")
    return value or None


def _base64(value: object) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise EventDecodeError(f"message.data must be a base64 string, not {kind_of(value)}")
    try:
        # proto3 JSON writes standard base64; readers accept the URL-safe alphabet too.
        return base64.b64decode(value.translate(_URL_SAFE), validate=True)
    except (binascii.Error, ValueError):
        raise EventDecodeError("message.data is not base64") from None


_URL_SAFE = str.maketrans("-_", "+/")


def _header_text(value: str) -> str:
    """Header values reach us as Latin-1; a UTF-8 object name sent raw reads back as UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
