"""StorageObjectData, StorageEvent and EventType: Google's schema, read the way real events are.

The fixtures are written here after Google's StorageObjectData samples
(googleapis/google-cloudevents testdata: a "simple" one with int64 fields as decimal strings, a
"complex" one with every field and numbers) and the Functions Framework conformance storage case.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from app.events.models import CustomerEncryption, EventType, StorageEvent, StorageObjectData

INT64_MAX = 2**63 - 1

# Shaped like Google's "simple" sample: what Cloud Storage really publishes (int64 as strings).
SIMPLE: dict[str, Any] = {
    "bucket": "some-bucket",
    "contentType": "text/plain",
    "crc32c": "rTVTeQ==",
    "etag": "CNHZkbuF/ugCEAE=",
    "generation": "1587627537231057",
    "id": "some-bucket/folder/Test.cs/1587627537231057",
    "kind": "storage#object",
    "md5Hash": "kF8MuJ5+CTJxvyhHS1xzRg==",
    "mediaLink": "https://www.googleapis.com/download/storage/v1/b/some-bucket/o/"
    "folder%2FTest.cs?generation=1587627537231057&alt=media",
    "metageneration": "1",
    "name": "folder/Test.cs",
    "selfLink": "https://www.googleapis.com/storage/v1/b/some-bucket/o/folder/Test.cs",
    "size": "352",
    "storageClass": "MULTI_REGIONAL",
    "timeCreated": "2020-04-23T07:38:57.230Z",
    "timeStorageClassUpdated": "2020-04-23T07:38:57.230Z",
    "updated": "2020-04-23T07:38:57.230Z",
}

# Shaped like Google's "complex" sample: every field of the schema, int64 fields as numbers.
COMPLEX: dict[str, Any] = {
    "bucket": "sample-bucket",
    "cacheControl": "no-cache, max-age=0",
    "componentCount": 2239872,
    "contentDisposition": 'attachment; filename="MyFile"',
    "contentEncoding": "gzip",
    "contentLanguage": "en-GB",
    "contentType": "application/octet-stream",
    "crc32c": "AAAAAA==",
    "customerEncryption": {"keySha256": "c2hhLTI1Ng==", "encryptionAlgorithm": "AES256"},
    "etag": "COu8mb3Dn+kCEAE=",
    "eventBasedHold": True,
    "generation": 96883251,
    "id": "sample-bucket/MyFile/1588778055917163",
    "kind": "storage#object",
    "kmsKeyName": "projects/p/locations/eu/keyRings/r/cryptoKeys/k",
    "md5Hash": "xrX0h3SqCoeoKidv+GvlBw==",
    "mediaLink": "https://www.googleapis.com/download/storage/v1/b/sample-bucket/o/MyFile"
    "?generation=1588778055917163&alt=media",
    "metadata": {"owner": "finance", "retention": "7y"},
    "metageneration": 1,
    "name": "MyFile",
    "retentionExpirationTime": "1960-08-15T07:40:17.432Z",
    "selfLink": "https://www.googleapis.com/storage/v1/b/sample-bucket/o/MyFile",
    "size": 0,
    "storageClass": "MULTI_REGIONAL",
    "temporaryHold": False,
    "timeCreated": "2020-05-06T15:14:15.917Z",
    "timeDeleted": "2020-05-18T09:07:51.799Z",
    "timeStorageClassUpdated": "1988-10-25T10:29:01.558Z",
    "updated": "1970-09-15T14:05:26.975Z",
}

# The conformance suite's CloudEvent: attributes plus the "simple" data.
CONFORMANCE_ATTRIBUTES: dict[str, Any] = {
    "specversion": "1.0",
    "type": "google.cloud.storage.object.v1.finalized",
    "source": "//storage.googleapis.com/projects/_/buckets/some-bucket",
    "subject": "objects/folder/Test.cs",
    "id": "aaaaaa-1111-bbbb-2222-cccccccccccc",
    "time": datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC),
    "datacontenttype": "application/json",
}

INT64_FIELDS = ["size", "generation", "metageneration", "componentCount"]
TIMESTAMP_FIELDS = [
    "timeCreated",
    "updated",
    "timeDeleted",
    "timeStorageClassUpdated",
    "retentionExpirationTime",
]


def parse(**fields: Any) -> StorageObjectData:
    return StorageObjectData.model_validate({"bucket": "b", "name": "n", **fields})


def rejected_fields(**fields: Any) -> list[tuple[str | int, ...]]:
    with pytest.raises(ValidationError) as caught:
        parse(**fields)
    return [problem["loc"] for problem in caught.value.errors()]


def event(
    data: dict[str, Any] | None = None,
    *,
    event_type: EventType = EventType.FINALIZED,
    event_id: str = "evt-1",
) -> StorageEvent:
    return StorageEvent.model_validate(
        {
            **CONFORMANCE_ATTRIBUTES,
            "id": event_id,
            "type": event_type,
            "data": StorageObjectData.model_validate(SIMPLE if data is None else data),
        }
    )


def test_simple_sample_parses_with_int64_strings_as_ints() -> None:
    data = StorageObjectData.model_validate(SIMPLE)
    assert data.bucket == "some-bucket"
    assert data.name == "folder/Test.cs"
    assert data.size == 352
    assert data.generation == 1587627537231057
    assert data.metageneration == 1
    assert data.content_type == "text/plain"
    assert data.crc32c == "rTVTeQ=="
    assert data.md5_hash == "kF8MuJ5+CTJxvyhHS1xzRg=="
    assert data.etag == "CNHZkbuF/ugCEAE="
    assert data.id == "some-bucket/folder/Test.cs/1587627537231057"
    assert data.kind == "storage#object"
    assert data.media_link == SIMPLE["mediaLink"]
    assert data.self_link == SIMPLE["selfLink"]
    assert data.storage_class == "MULTI_REGIONAL"
    created = datetime(2020, 4, 23, 7, 38, 57, 230000, tzinfo=UTC)
    assert data.time_created == created
    assert data.time_storage_class_updated == created
    assert data.updated == created
    assert data.model_extra == {}


def test_complex_sample_parses_every_field_of_the_schema() -> None:
    data = StorageObjectData.model_validate(COMPLEX)
    assert data.bucket == "sample-bucket"
    assert data.name == "MyFile"
    assert data.cache_control == "no-cache, max-age=0"
    assert data.component_count == 2239872
    assert data.content_disposition == 'attachment; filename="MyFile"'
    assert data.content_encoding == "gzip"
    assert data.content_language == "en-GB"
    assert data.content_type == "application/octet-stream"
    assert data.crc32c == "AAAAAA=="
    assert data.customer_encryption == CustomerEncryption(
        encryption_algorithm="AES256", key_sha256="c2hhLTI1Ng=="
    )
    assert data.etag == "COu8mb3Dn+kCEAE="
    assert data.event_based_hold is True
    assert data.generation == 96883251
    assert data.id == "sample-bucket/MyFile/1588778055917163"
    assert data.kind == "storage#object"
    assert data.kms_key_name == "projects/p/locations/eu/keyRings/r/cryptoKeys/k"
    assert data.md5_hash == "xrX0h3SqCoeoKidv+GvlBw=="
    assert data.media_link == COMPLEX["mediaLink"]
    assert data.metadata == {"owner": "finance", "retention": "7y"}
    assert data.metageneration == 1
    assert data.retention_expiration_time == datetime(1960, 8, 15, 7, 40, 17, 432000, tzinfo=UTC)
    assert data.self_link == COMPLEX["selfLink"]
    assert data.size == 0
    assert data.storage_class == "MULTI_REGIONAL"
    assert data.temporary_hold is False
    assert data.time_created == datetime(2020, 5, 6, 15, 14, 15, 917000, tzinfo=UTC)
    assert data.time_deleted == datetime(2020, 5, 18, 9, 7, 51, 799000, tzinfo=UTC)
    assert data.time_storage_class_updated == datetime(1988, 10, 25, 10, 29, 1, 558000, tzinfo=UTC)
    assert data.updated == datetime(1970, 9, 15, 14, 5, 26, 975000, tzinfo=UTC)
    assert data.model_extra == {}


def test_every_schema_property_has_a_field() -> None:
    # COMPLEX carries every property of Google's schema; none may land in model_extra.
    data = StorageObjectData.model_validate(COMPLEX)
    dumped = data.model_dump(by_alias=True, exclude_none=True)
    assert set(dumped) == set(COMPLEX)


def test_conformance_event_becomes_one_storage_event() -> None:
    storage_event = event()
    assert storage_event.id == "evt-1"
    assert storage_event.type is EventType.FINALIZED
    assert storage_event.source == "//storage.googleapis.com/projects/_/buckets/some-bucket"
    assert storage_event.subject == "objects/folder/Test.cs"
    assert storage_event.bucket == "some-bucket"
    assert storage_event.object_name == "folder/Test.cs"
    assert storage_event.log_fields() == {
        "event_id": "evt-1",
        "event_type": "finalized",
        "bucket": "some-bucket",
        "object": "folder/Test.cs",
    }


@pytest.mark.parametrize("field", INT64_FIELDS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("352", 352), (352, 352), (str(INT64_MAX), INT64_MAX), (INT64_MAX, INT64_MAX)],
)
def test_int64_fields_accept_decimal_strings_and_numbers(
    field: str, value: object, expected: int
) -> None:
    dumped = parse(**{field: value}).model_dump(by_alias=True)
    assert dumped[field] == expected
    assert type(dumped[field]) is int


@pytest.mark.parametrize("field", INT64_FIELDS)
@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        "true",
        1.5,
        "352.5",
        -1,
        "-1",
        INT64_MAX + 1,
        str(INT64_MAX + 1),
        "1e3",
        "0x10",
        "",
        "three",
        [352],
        {"value": 352},
    ],
)
def test_int64_fields_reject_what_is_not_a_non_negative_int64(field: str, value: object) -> None:
    assert rejected_fields(**{field: value}) == [(field,)]


@pytest.mark.parametrize("field", TIMESTAMP_FIELDS)
def test_millisecond_timestamps_become_aware_datetimes(field: str) -> None:
    value = parse(**{field: "2020-04-23T07:38:57.230Z"}).model_dump(by_alias=True)[field]
    assert value == datetime(2020, 4, 23, 7, 38, 57, 230000, tzinfo=UTC)
    assert value.utcoffset() == timedelta(0)


@pytest.mark.parametrize("field", TIMESTAMP_FIELDS)
def test_nanosecond_timestamps_are_truncated_to_microseconds(field: str) -> None:
    value = parse(**{field: "2020-04-23T07:38:57.123456789Z"}).model_dump(by_alias=True)[field]
    assert value == datetime(2020, 4, 23, 7, 38, 57, 123456, tzinfo=UTC)


def test_timestamps_keep_their_offset() -> None:
    data = parse(updated="2020-04-23T09:38:57.230+02:00")
    assert data.updated == datetime(2020, 4, 23, 7, 38, 57, 230000, tzinfo=UTC)
    assert data.updated is not None
    assert data.updated.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("field", TIMESTAMP_FIELDS)
@pytest.mark.parametrize("value", ["2020-04-23T07:38:57.230", "2020-04-23T07:38:57", "2020-04-23"])
def test_naive_timestamps_are_rejected(field: str, value: str) -> None:
    assert rejected_fields(**{field: value}) == [(field,)]


@pytest.mark.parametrize("value", ["yesterday", "2020-13-45T00:00:00Z", True])
def test_unreadable_timestamps_are_rejected(value: object) -> None:
    assert rejected_fields(timeCreated=value) == [("timeCreated",)]


def test_unknown_fields_are_kept() -> None:
    data = parse(softDeleteTime="2024-01-01T00:00:00Z", hardDeleteTime=None, retention={"m": 1})
    assert data.model_extra == {
        "softDeleteTime": "2024-01-01T00:00:00Z",
        "hardDeleteTime": None,
        "retention": {"m": 1},
    }


def test_unknown_customer_encryption_fields_are_kept() -> None:
    data = parse(
        customerEncryption={
            "encryptionAlgorithm": "AES256",
            "keySha256": "c2hh",
            "keyVersion": "2",
        }
    )
    assert data.customer_encryption is not None
    assert data.customer_encryption.encryption_algorithm == "AES256"
    assert data.customer_encryption.key_sha256 == "c2hh"
    assert data.customer_encryption.model_extra == {"keyVersion": "2"}


@pytest.mark.parametrize("field", ["bucket", "name"])
def test_bucket_and_name_are_required(field: str) -> None:
    values = {"bucket": "b", "name": "n"}
    del values[field]
    with pytest.raises(ValidationError) as caught:
        StorageObjectData.model_validate(values)
    [problem] = caught.value.errors()
    assert problem["loc"] == (field,)
    assert problem["type"] == "missing"


@pytest.mark.parametrize("field", ["bucket", "name"])
def test_bucket_and_name_must_not_be_empty(field: str) -> None:
    assert rejected_fields(**{field: ""}) == [(field,)]


def test_metadata_values_must_be_strings() -> None:
    assert rejected_fields(metadata={"owner": 7}) == [("metadata", "owner")]


def test_data_is_immutable() -> None:
    data = parse()
    with pytest.raises(ValidationError):
        data.name = "other"  # type: ignore[misc]


def test_change_key_names_type_bucket_name_generation_and_metageneration() -> None:
    key = event({"bucket": "b", "name": "dir/x.txt", "generation": "7", "metageneration": "2"})
    assert key.change_key() == '["google.cloud.storage.object.v1.finalized","b","dir/x.txt",7,2]'


def test_change_key_is_equal_across_event_ids() -> None:
    # Cloud Storage may publish one change as several messages with different ids.
    data = {"bucket": "b", "name": "x", "generation": "7", "metageneration": "1"}
    assert event(data, event_id="a").change_key() == event(data, event_id="b").change_key()


def test_change_key_differs_across_types() -> None:
    data = {"bucket": "b", "name": "x", "generation": "7", "metageneration": "1"}
    keys = {event(data, event_type=event_type).change_key() for event_type in EventType}
    assert len(keys) == len(EventType)


@pytest.mark.parametrize(
    "other",
    [
        {"generation": "8", "metageneration": "1"},
        {"generation": "7", "metageneration": "2"},
        {"generation": "7", "metageneration": "1", "name": "y"},
        {"generation": "7", "metageneration": "1", "bucket": "c"},
    ],
)
def test_change_key_differs_across_changes(other: dict[str, str]) -> None:
    base = {"bucket": "b", "name": "x", "generation": "7", "metageneration": "1"}
    assert event(base).change_key() != event({**base, **other}).change_key()


def test_change_key_falls_back_to_the_event_id_without_a_generation() -> None:
    data = {"bucket": "b", "name": "x"}
    first, second = event(data, event_id="a"), event(data, event_id="b")
    assert first.change_key() != second.change_key()
    assert json.loads(first.change_key())[-2:] == ["id", "a"]
    assert first.change_key() == event(data, event_id="a").change_key()


@pytest.mark.parametrize(
    ("event_type", "short"),
    [
        (EventType.FINALIZED, "finalized"),
        (EventType.DELETED, "deleted"),
        (EventType.ARCHIVED, "archived"),
        (EventType.METADATA_UPDATED, "metadataUpdated"),
    ],
)
def test_event_type_short_names_round_trip(event_type: EventType, short: str) -> None:
    assert event_type.short == short
    assert EventType.from_short(short) is event_type


@pytest.mark.parametrize("short", ["", "created", "Finalized", "google.cloud.storage.object.v1"])
def test_unknown_short_names_are_refused(short: str) -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        EventType.from_short(short)


def test_storage_event_requires_a_known_type() -> None:
    with pytest.raises(ValidationError):
        StorageEvent.model_validate(
            {**CONFORMANCE_ATTRIBUTES, "type": "com.example.other", "data": SIMPLE}
        )


def test_change_key_cannot_be_forged_by_moving_separators_between_fields() -> None:
    first = event({"bucket": "b|x", "name": "7|1", "generation": "2"})
    second = event({"bucket": "b", "name": "x|7|1", "generation": "2"})
    assert first.change_key() != second.change_key()
