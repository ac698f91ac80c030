"""1st-gen background events about Cloud Storage, `{context, data}` and flat, decode to the
StorageEvent Eventarc's event of the same change decodes to. Where functions-framework's
conversion falls short (a string resource, a project id other than `_`, the `#generation`
suffix left in the name), these read it right."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from app.events.decode import decode_event
from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent
from tests.events.payloads import GENERATION, decoded, ignored, request, sample

RESOURCE = "projects/_/buckets/some-bucket/objects/folder/Test.cs"
LEGACY_FINALIZE = ["legacy-finalize", "legacy-flat-finalize", "legacy-object-change"]


def refusal(document: dict[str, Any]) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(*request(document))
    error = caught.value
    assert "\n" not in error.detail
    assert len(error.detail) < 400
    return error


def event_of(document: dict[str, Any]) -> StorageEvent:
    event = decode_event(*request(document))
    assert isinstance(event, StorageEvent)
    return event


def with_context(**changes: Any) -> dict[str, Any]:
    """The {context, data} sample with context fields changed (None removes one)."""
    document = sample("legacy-finalize")
    context = document["body"]["context"]
    context.update(changes)
    document["body"]["context"] = {k: v for k, v in context.items() if v is not None}
    return document


def flat(**changes: Any) -> dict[str, Any]:
    document = sample("legacy-flat-finalize")
    document["body"].update(changes)
    document["body"] = {k: v for k, v in document["body"].items() if v is not None}
    return document


@pytest.mark.parametrize("name", LEGACY_FINALIZE)
def test_each_form_names_the_change_eventarc_names(name: str) -> None:
    eventarc = decoded("eventarc-finalized")
    event = decoded(name)
    assert event.change_key() == eventarc.change_key()
    assert event.type is EventType.FINALIZED
    assert (event.bucket, event.object_name) == ("some-bucket", "folder/Test.cs")
    assert event.data.generation == GENERATION
    assert event.source == eventarc.source
    assert event.subject == eventarc.subject
    assert event.time == datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC)


def test_context_form_is_eventarcs_event_whole() -> None:
    event, eventarc = decoded("legacy-finalize"), decoded("eventarc-finalized")
    assert event.id == eventarc.id == "aaaaaa-1111-bbbb-2222-cccccccccccc"
    assert event.data == eventarc.data
    assert event.datacontenttype == "application/json"


def test_flat_form_reads_the_event_id() -> None:
    assert decoded("legacy-flat-finalize").id == "1234567"


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("google.storage.object.finalize", EventType.FINALIZED),
        ("google.storage.object.delete", EventType.DELETED),
        ("google.storage.object.archive", EventType.ARCHIVED),
        ("google.storage.object.metadataUpdate", EventType.METADATA_UPDATED),
    ],
)
def test_each_event_type_maps_to_eventarcs(event_type: str, expected: EventType) -> None:
    assert event_of(with_context(eventType=event_type)).type is expected
    assert event_of(flat(eventType=event_type)).type is expected


def test_object_change_of_a_missing_object_is_a_deletion() -> None:
    event = decoded("legacy-object-change-deleted")
    assert event.type is EventType.DELETED
    assert event.change_key() == decoded("eventarc-deleted").change_key()


@pytest.mark.parametrize("state", ["exists", None, "something-new"])
def test_object_change_of_anything_else_is_a_new_object(state: str | None) -> None:
    document = sample("legacy-object-change")
    document["body"]["data"]["resourceState"] = state
    assert event_of(document).type is EventType.FINALIZED


@pytest.mark.parametrize(
    "resource",
    [
        RESOURCE,
        {"service": "storage.googleapis.com", "name": RESOURCE, "type": "storage#object"},
        {"name": RESOURCE},
        f"{RESOURCE}#{GENERATION}",
        {"service": "storage.googleapis.com", "name": f"{RESOURCE}#{GENERATION}"},
        f"projects/my-project-123/buckets/some-bucket/objects/folder/Test.cs#{GENERATION}",
        {"name": "projects/my-project-123/buckets/some-bucket/objects/folder/Test.cs"},
    ],
)
def test_resource_as_string_or_object_with_any_project_and_generation_suffix(
    resource: object,
) -> None:
    event = event_of(with_context(resource=resource))
    assert event.change_key() == decoded("eventarc-finalized").change_key()
    assert event.object_name == "folder/Test.cs"
    assert event.source == "//storage.googleapis.com/projects/_/buckets/some-bucket"


def test_generation_comes_from_the_suffix_when_the_data_has_none() -> None:
    document = with_context(resource=f"{RESOURCE}#{GENERATION}")
    del document["body"]["data"]["generation"]
    assert event_of(document).data.generation == GENERATION


def test_bucket_and_name_come_from_the_resource_when_the_data_has_none() -> None:
    document = with_context(resource=f"{RESOURCE}#{GENERATION}")
    document["body"]["data"] = {"metageneration": "1"}
    event = event_of(document)
    assert event.change_key() == decoded("eventarc-finalized").change_key()


def test_a_name_that_itself_ends_in_hash_digits_is_kept() -> None:
    document = with_context(resource="projects/_/buckets/some-bucket/objects/take#2")
    document["body"]["data"]["name"] = "take#2"
    event = event_of(document)
    assert event.object_name == "take#2"
    assert event.data.generation == GENERATION


def test_a_hash_name_with_its_generation_suffix_is_stripped_once() -> None:
    document = with_context(resource=f"projects/_/buckets/some-bucket/objects/take#2#{GENERATION}")
    document["body"]["data"]["name"] = "take#2"
    assert event_of(document).object_name == "take#2"


def test_object_names_with_slashes_spaces_and_unicode() -> None:
    name = "dir/sub dir/résumé 😀.pdf"
    document = with_context(resource=f"projects/_/buckets/some-bucket/objects/{name}#{GENERATION}")
    document["body"]["data"]["name"] = name
    event = event_of(document)
    assert event.subject == f"objects/{name}"


def test_other_event_types_are_ignored_and_named() -> None:
    event = ignored(sample("legacy-other-type"))
    assert event.type == "providers/cloud.firestore/eventTypes/document.write"
    assert event.id == "1234570"
    assert event.source == "projects/my-project/databases/(default)/documents/users/ada"


def test_other_event_type_without_a_readable_resource_is_still_ignored() -> None:
    document = sample("legacy-other-type")
    document["body"]["context"]["resource"] = 42
    assert ignored(document).source == "unknown"


def test_huge_other_event_type_is_named_briefly() -> None:
    event = ignored(with_context(eventType="google.pubsub." + "x" * 1_000_000))
    assert len(event.type) < 200


# Malformed: 400 with a one-line reason.


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"eventId": None}, "context.eventId is missing"),
        ({"eventId": ""}, "context.eventId is empty"),
        ({"eventId": 1234}, "context.eventId must be a string, not a number"),
        ({"eventType": None}, "context.eventType is missing"),
        ({"eventType": ["google.storage.object.finalize"]}, "must be a string, not a list"),
        ({"resource": None}, "context.resource is missing"),
        ({"resource": 7}, "context.resource must be a non-empty string"),
        ({"resource": {"service": "storage.googleapis.com"}}, "context.resource.name is missing"),
        ({"resource": {"name": True}}, "context.resource.name must be a non-empty string"),
        ({"resource": "projects/_/buckets/some-bucket"}, "is not projects/PROJECT/buckets"),
        ({"resource": "buckets/b/objects/o"}, "is not projects/PROJECT/buckets"),
        ({"timestamp": "yesterday"}, "context.timestamp is not an RFC 3339 timestamp"),
        ({"timestamp": "2020-09-29T11:32:00"}, "context.timestamp has no time zone offset"),
        ({"timestamp": 1601379120}, "context.timestamp must be a string"),
    ],
)
def test_bad_context_is_refused(changes: dict[str, Any], reason: str) -> None:
    assert reason in refusal(with_context(**changes)).detail


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"eventId": None}, "eventId is missing"),
        ({"resource": None}, "resource is missing"),
        ({"data": None}, "data is missing"),
    ],
)
def test_bad_flat_event_is_refused(changes: dict[str, Any], reason: str) -> None:
    assert reason in refusal(flat(**changes)).detail


@pytest.mark.parametrize("context", ["a string", [1, 2], 5])
def test_context_that_is_not_an_object_is_refused(context: object) -> None:
    document = sample("legacy-finalize")
    document["body"]["context"] = context
    assert "context must be an object" in refusal(document).detail


@pytest.mark.parametrize(
    ("data", "kind"), [([1, 2], "a list"), ("text", "a string"), (3, "a number")]
)
def test_data_that_is_not_an_object_is_refused(data: object, kind: str) -> None:
    document = sample("legacy-finalize")
    document["body"]["data"] = data
    assert f"data must be an object (the object resource), not {kind}" in refusal(document).detail


@pytest.mark.parametrize(
    ("field", "value"),
    [("bucket", "other-bucket"), ("name", "folder/Other.cs"), ("generation", "1587627537231099")],
)
def test_data_disagreeing_with_the_resource_is_refused(field: str, value: str) -> None:
    document = with_context(resource=f"{RESOURCE}#{GENERATION}")
    document["body"]["data"][field] = value
    assert f"data.{field} disagrees with context.resource" in refusal(document).detail


def test_invalid_data_field_is_named_without_its_value() -> None:
    document = sample("legacy-finalize")
    document["body"]["data"]["size"] = "secret-size"
    error = refusal(document)
    assert error.problems[0]["field"] == "data.size"
    assert "secret-size" not in json.dumps(error.problems)


def test_generation_suffix_beyond_int64_is_refused() -> None:
    document = with_context(resource=f"{RESOURCE}#9999999999999999999")
    del document["body"]["data"]["generation"]
    assert refusal(document).problems[0]["field"] == "data.generation"


def test_lone_surrogate_is_refused() -> None:
    headers, body = request(sample("legacy-finalize"))
    body = body.replace(b'"contentType": "text/plain"', b'"contentType": "\\udfff"')
    with pytest.raises(EventDecodeError, match="surrogate"):
        decode_event(headers, body)


def test_huge_resource_is_refused_briefly() -> None:
    error = refusal(with_context(resource="projects/_/buckets/b" + "/x" * 500_000))
    assert "disagrees" in error.detail or "is not" in error.detail
