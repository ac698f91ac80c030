"""Cloud Storage events as pydantic models: pure data, no I/O.

`StorageObjectData` follows Google's schema for `google.events.cloud.storage.v1.StorageObjectData`
(googleapis/google-cloudevents, jsonschema/google/events/cloud/storage/v1/StorageObjectData.json).
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel


class EventType(StrEnum):
    FINALIZED = "google.cloud.storage.object.v1.finalized"
    DELETED = "google.cloud.storage.object.v1.deleted"
    ARCHIVED = "google.cloud.storage.object.v1.archived"
    METADATA_UPDATED = "google.cloud.storage.object.v1.metadataUpdated"

    @property
    def short(self) -> str:
        """`finalized`, `deleted`, ...: the last segment, as people and `app.emit` name it."""
        return self.value.rsplit(".", 1)[1]

    @classmethod
    def from_short(cls, short: str) -> EventType:
        for member in cls:
            if member.short == short:
                return member
        raise ValueError(f"unknown event type {short!r}")


def _no_booleans(value: object) -> object:
    # pydantic's lax mode would read `true` as 1; a boolean size is a broken producer, not a number.
    if isinstance(value, bool):
        raise ValueError("must be an integer or a decimal string, not a boolean")
    return value


# proto3 JSON writes int64 as a decimal string ("352"); Google's samples use numbers: accept both.
Int64 = Annotated[int, BeforeValidator(_no_booleans), Field(ge=0, le=2**63 - 1)]
Timestamp = AwareDatetime  # RFC 3339; pydantic keeps microseconds of a nanosecond timestamp


class CustomerEncryption(BaseModel):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    encryption_algorithm: str | None = None
    key_sha256: str | None = Field(default=None, alias="keySha256")


class StorageObjectData(BaseModel):
    """An object in Cloud Storage; unknown fields are kept (`model_extra`)."""

    model_config = ConfigDict(
        extra="allow", alias_generator=to_camel, populate_by_name=True, frozen=True
    )

    bucket: str = Field(min_length=1)
    name: str = Field(min_length=1)
    generation: Int64 | None = None
    metageneration: Int64 | None = None
    size: Int64 | None = None
    component_count: Int64 | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    content_disposition: str | None = None
    content_language: str | None = None
    cache_control: str | None = None
    crc32c: str | None = Field(default=None, alias="crc32c")
    md5_hash: str | None = None
    etag: str | None = None
    id: str | None = None
    kind: str | None = None
    self_link: str | None = None
    media_link: str | None = None
    storage_class: str | None = None
    kms_key_name: str | None = None
    time_created: Timestamp | None = None
    updated: Timestamp | None = None
    time_deleted: Timestamp | None = None
    time_storage_class_updated: Timestamp | None = None
    retention_expiration_time: Timestamp | None = None
    temporary_hold: bool | None = None
    event_based_hold: bool | None = None
    metadata: dict[str, str] | None = None
    customer_encryption: CustomerEncryption | None = None


class StorageEvent(BaseModel):
    """One CloudEvent about one object: the envelope's attributes and the object's data."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: str
    type: EventType
    specversion: str = "1.0"
    subject: str | None = None
    time: datetime | None = None
    datacontenttype: str | None = None
    extensions: dict[str, str] = Field(default_factory=dict)
    data: StorageObjectData

    @property
    def bucket(self) -> str:
        return self.data.bucket

    @property
    def object_name(self) -> str:
        return self.data.name

    def change_key(self) -> str:
        """Names the storage change, not the message: Cloud Storage may publish one change as
        several messages with different ids, so deduplicate on what changed."""
        data = self.data
        if data.generation is None:
            # Without a generation the change cannot be told apart from a later one on the
            # same name; the event id is the best identity left.
            parts: list[object] = [self.type.value, data.bucket, data.name, "id", self.id]
        else:
            parts = [self.type.value, data.bucket, data.name, data.generation, data.metageneration]
        # A JSON array cannot be confused across fields, whatever characters the names hold.
        return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))

    def log_fields(self) -> dict[str, str]:
        return {
            "event_id": self.id,
            "event_type": self.type.short,
            "bucket": self.bucket,
            "object": self.object_name,
        }


class UnhandledEvent(BaseModel):
    """A well-formed CloudEvent of a type this service does not handle."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: str
    type: str
