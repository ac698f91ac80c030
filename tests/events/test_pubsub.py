"""Cloud Storage Pub/Sub notifications, however Pub/Sub hands them over (push, unwrapped push,
Eventarc's messagePublished), decode to the StorageEvent Eventarc's own event of the same change
decodes to; broken envelopes are refused with a one-line reason, other topics' messages ignored.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from app.events.decode import decode_event
from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent, UnhandledEvent
from app.events.pubsub import MESSAGE_PUBLISHED
from tests.events.payloads import (
    GENERATION,
    as_binary,
    decoded,
    encode,
    ignored,
    message_data,
    request,
    sample,
)

PUBSUB_FINALIZE = [
    "pubsub-push-finalize",
    "pubsub-push-snake",
    "pubsub-push-none",
    "pubsub-unwrapped-finalize",
    "pubsub-unwrapped-none",
    "messagepublished-finalize",
]
WITH_DATA = [
    "pubsub-push-finalize",
    "pubsub-push-snake",
    "pubsub-unwrapped-finalize",
    "messagepublished-finalize",
]
EVENT_TIME = datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC)


def refusal(document: dict[str, Any]) -> EventDecodeError:
    return refusal_of(*request(document))


def refusal_of(headers: dict[str, str], body: bytes) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(headers, body)
    error = caught.value
    assert "\n" not in error.detail
    assert len(error.detail) < 400
    return error


def push(**attributes: Any) -> dict[str, Any]:
    """The wrapped finalize sample with attributes changed (None removes one)."""
    document = sample("pubsub-push-finalize")
    message = document["body"]["message"]
    message["attributes"].update(attributes)
    message["attributes"] = {k: v for k, v in message["attributes"].items() if v is not None}
    return document


def with_message(**fields: Any) -> dict[str, Any]:
    document = sample("pubsub-push-finalize")
    document["body"]["message"].update(fields)
    document["body"]["message"] = {
        k: v for k, v in document["body"]["message"].items() if v is not None
    }
    return document


def unwrapped(**headers: str | None) -> tuple[dict[str, str], bytes]:
    """The unwrapped finalize sample with headers changed (None removes one)."""
    found, body = request(sample("pubsub-unwrapped-finalize"))
    for name, value in headers.items():
        if value is None:
            del found[name]
        else:
            found[name] = value
    return found, body


@pytest.mark.parametrize("name", PUBSUB_FINALIZE)
def test_each_form_names_the_change_eventarc_names(name: str) -> None:
    eventarc = decoded("eventarc-finalized")
    event = decoded(name)
    assert event.change_key() == eventarc.change_key()
    assert event.type is EventType.FINALIZED
    assert (event.bucket, event.object_name) == ("some-bucket", "folder/Test.cs")
    assert event.data.generation == GENERATION
    assert event.data.metageneration == 1
    assert event.source == eventarc.source
    assert event.subject == eventarc.subject
    assert event.time == EVENT_TIME


@pytest.mark.parametrize("name", PUBSUB_FINALIZE)
def test_each_form_matches_eventarcs_binary_mode_too(name: str) -> None:
    eventarc = decode_event(*as_binary(sample("eventarc-finalized")))
    assert isinstance(eventarc, StorageEvent)
    assert decoded(name).change_key() == eventarc.change_key()


@pytest.mark.parametrize("name", WITH_DATA)
def test_json_api_v1_data_is_the_whole_object_resource(name: str) -> None:
    event = decoded(name)
    assert event.data == decoded("eventarc-finalized").data
    assert event.data.size == 352
    assert event.data.content_type == "text/plain"
    assert event.extensions["payloadformat"] == "JSON_API_V1"


@pytest.mark.parametrize(
    ("name", "message_id"),
    [
        ("pubsub-push-finalize", "11111111111"),
        ("pubsub-push-snake", "11111111112"),
        ("pubsub-unwrapped-finalize", "11111111116"),
        ("messagepublished-finalize", "11111111118"),
    ],
)
def test_event_id_is_the_pubsub_message_id(name: str, message_id: str) -> None:
    assert decoded(name).id == message_id


@pytest.mark.parametrize("name", ["pubsub-push-none", "pubsub-unwrapped-none"])
def test_payload_format_none_knows_only_the_attributes(name: str) -> None:
    event = decoded(name)
    assert event.extensions["payloadformat"] == "NONE"
    assert event.data.size is None
    assert event.data.content_type is None
    assert event.data.metadata is None


def test_payload_format_none_ignores_any_data() -> None:
    document = push(payloadFormat="NONE")
    assert decode_event(*request(document)).data.size is None  # type: ignore[union-attr]


def test_payload_format_none_delete_has_no_metageneration() -> None:
    document = push(payloadFormat="NONE", eventType="OBJECT_DELETE")
    del document["body"]["message"]["data"]
    event = decode_event(*request(document))
    assert isinstance(event, StorageEvent)
    assert event.type is EventType.DELETED
    assert event.data.metageneration is None
    assert event.data.generation == GENERATION


def test_missing_payload_format_is_read_from_whether_there_is_data() -> None:
    event = decode_event(*request(push(payloadFormat=None)))
    assert isinstance(event, StorageEvent)
    assert event.data.size == 352
    bare = push(payloadFormat=None)
    del bare["body"]["message"]["data"]
    event = decode_event(*request(bare))
    assert isinstance(event, StorageEvent)
    assert event.extensions["payloadformat"] == "NONE"


def test_overwritten_delete_matches_eventarcs_delete_and_keeps_the_attributes() -> None:
    event = decoded("pubsub-push-delete")
    assert event.type is EventType.DELETED
    assert event.change_key() == decoded("eventarc-deleted").change_key()
    assert event.extensions["overwrittenbygeneration"] == "1587627537231058"
    assert "overwrotegeneration" not in event.extensions


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("OBJECT_FINALIZE", EventType.FINALIZED),
        ("OBJECT_DELETE", EventType.DELETED),
        ("OBJECT_ARCHIVE", EventType.ARCHIVED),
        ("OBJECT_METADATA_UPDATE", EventType.METADATA_UPDATED),
    ],
)
def test_each_event_type_maps_to_eventarcs(event_type: str, expected: EventType) -> None:
    event = decode_event(*request(push(eventType=event_type)))
    assert isinstance(event, StorageEvent)
    assert event.type is expected


def test_extensions_carry_notification_config_and_subscription() -> None:
    event = decoded("pubsub-push-finalize")
    assert event.extensions == {
        "payloadformat": "JSON_API_V1",
        "notificationconfig": "projects/_/buckets/some-bucket/notificationConfigs/5",
        "subscription": "projects/my-project/subscriptions/storage-notifier",
    }
    assert decoded("pubsub-unwrapped-finalize").extensions == event.extensions


def test_overwrote_generation_is_kept() -> None:
    event = decode_event(*request(push(overwroteGeneration="1587627537231000")))
    assert isinstance(event, StorageEvent)
    assert event.extensions["overwrotegeneration"] == "1587627537231000"


def test_publish_time_stands_in_for_a_missing_event_time() -> None:
    event = decode_event(*request(push(eventTime=None)))
    assert isinstance(event, StorageEvent)
    assert event.time == datetime(2020, 9, 29, 11, 32, 0, 456000, tzinfo=UTC)
    headers, body = unwrapped(eventtime=None)
    assert decode_event(headers, body).time == event.time  # type: ignore[union-attr]


def test_no_time_at_all_leaves_the_time_unset() -> None:
    document = push(eventTime=None)
    del document["body"]["message"]["publishTime"]
    assert decode_event(*request(document)).time is None  # type: ignore[union-attr]


def test_unwrapped_attribute_header_names_are_case_insensitive() -> None:
    headers, body = request(sample("pubsub-unwrapped-finalize"))
    shouted = {name.title(): value for name, value in headers.items()}
    event = decode_event(shouted, body)
    assert isinstance(event, StorageEvent)
    assert event.change_key() == decoded("eventarc-finalized").change_key()


def test_unwrapped_utf8_object_name_read_from_latin1_header() -> None:
    name = "résumé/naïve €.txt"
    headers, _ = request(sample("pubsub-unwrapped-finalize"))
    headers["objectid"] = name.encode().decode("latin-1")
    body = dict(sample("pubsub-unwrapped-finalize")["body"], name=name)
    event = decode_event(headers, json.dumps(body).encode())
    assert isinstance(event, StorageEvent)
    assert event.object_name == name


def test_url_safe_base64_data_is_read() -> None:
    data = message_data(sample("pubsub-push-finalize"))
    data["metadata"] = {"note": "??>>??"}  # standard base64 of this has '+' and '/'
    raw = json.dumps(data).encode()
    assert b"+" in base64.b64encode(raw) or b"/" in base64.b64encode(raw)
    event = decode_event(*request(with_message(data=base64.urlsafe_b64encode(raw).decode())))
    assert event.data.metadata == {"note": "??>>??"}  # type: ignore[union-attr]


# Recognised but unusable: acknowledged (200 ignored) so Pub/Sub does not retry for 7 days.


def test_message_of_another_topic_is_ignored() -> None:
    event = ignored(sample("pubsub-push-other-topic"))
    assert event.type == MESSAGE_PUBLISHED
    assert event.id == "11111111115"
    assert event.source == "projects/my-project/subscriptions/storage-notifier"


def test_message_without_attributes_is_ignored() -> None:
    document = sample("pubsub-push-other-topic")
    del document["body"]["message"]["attributes"]
    assert ignored(document).type == MESSAGE_PUBLISHED


def test_unknown_event_type_is_ignored_and_named() -> None:
    event = ignored(push(eventType="OBJECT_FOO", objectId=None))
    assert event.type == "pubsub:OBJECT_FOO"
    assert event.id == "11111111111"


def test_huge_unknown_event_type_is_named_briefly() -> None:
    event = ignored(push(eventType="X" * 100_000))
    assert event.type.startswith("pubsub:XXX")
    assert len(event.type) < 200


def test_unknown_payload_format_is_ignored_and_named() -> None:
    assert ignored(push(payloadFormat="PROTOBUF")).type == (
        "pubsub:OBJECT_FINALIZE payloadFormat PROTOBUF"
    )


def test_message_published_of_another_topic_is_ignored() -> None:
    document = sample("messagepublished-finalize")
    document["body"]["data"]["message"]["attributes"] = {"origin": "billing"}
    event = ignored(document)
    assert event.type == MESSAGE_PUBLISHED
    assert event.id == "11111111118"


def test_message_published_without_message_id_uses_the_cloud_event_id() -> None:
    document = sample("messagepublished-finalize")
    for key in ("messageId", "message_id"):
        del document["body"]["data"]["message"][key]
    assert decoded_from(document).id == "3103425958877813"


def decoded_from(document: dict[str, Any]) -> StorageEvent:
    event = decode_event(*request(document))
    assert isinstance(event, StorageEvent)
    return event


def test_message_published_in_binary_mode() -> None:
    headers, body = as_binary(sample("messagepublished-finalize"))
    event = decode_event(headers, body)
    assert isinstance(event, StorageEvent)
    assert event.change_key() == decoded("eventarc-finalized").change_key()


def test_unwrapped_message_without_storage_headers_is_ignored() -> None:
    headers = {
        "x-goog-pubsub-message-id": "99",
        "x-goog-pubsub-subscription-name": "projects/p/subscriptions/s",
    }
    event = decode_event(headers, b"hello, not json")
    assert isinstance(event, UnhandledEvent)
    assert (event.id, event.type) == ("99", MESSAGE_PUBLISHED)
    assert event.source == "projects/p/subscriptions/s"


# Malformed: 400 with a one-line reason.


def test_object_resource_without_attribute_headers_names_write_metadata() -> None:
    _, body = request(sample("pubsub-unwrapped-finalize"))
    error = refusal_of({"content-type": "application/json"}, body)
    assert "write_metadata" in error.detail


def test_attribute_headers_without_message_id_header_names_write_metadata() -> None:
    headers, body = request(sample("pubsub-unwrapped-finalize"))
    del headers["x-goog-pubsub-message-id"]
    assert "write_metadata" in refusal_of(headers, body).detail


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (None, "message is missing"),
        ("hello", "message must be an object"),
        ([1, 2], "message must be an object"),
    ],
)
def test_bad_message_is_refused(message: object, reason: str) -> None:
    document = sample("pubsub-push-finalize")
    document["body"]["message"] = message
    assert reason in refusal(document).detail


def test_missing_message_id_is_refused() -> None:
    assert "messageId is missing" in refusal(with_message(messageId=None)).detail


@pytest.mark.parametrize(
    ("field", "value"),
    [("messageId", 11111111111), ("publishTime", 1601379120), ("attributes", ["eventType"])],
)
def test_wrong_types_in_the_message_are_refused(field: str, value: object) -> None:
    assert field in refusal(with_message(**{field: value})).detail


@pytest.mark.parametrize("attribute", ["objectGeneration", "bucketId", "eventType"])
def test_number_where_an_attribute_string_belongs_is_refused(attribute: str) -> None:
    error = refusal(push(**{attribute: 1587627537231057}))
    assert attribute in error.detail
    assert "must be a string" in error.detail


def test_subscription_must_be_a_string() -> None:
    document = sample("pubsub-push-finalize")
    document["body"]["subscription"] = 7
    assert "subscription must be a string" in refusal(document).detail


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"bucketId": None}, "bucketId is missing"),
        ({"objectId": None}, "objectId is missing"),
        ({"objectId": ""}, "objectId is empty"),
        ({"eventType": None}, "eventType is missing"),
        ({"eventType": ""}, "eventType is empty"),
    ],
)
def test_missing_required_attribute_is_refused(changes: dict[str, Any], reason: str) -> None:
    assert reason in refusal(push(**changes)).detail


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("%%%not base64%%%", "message.data is not base64"),
        ("eyJh", "message.data is not valid JSON"),  # '{"a' cut short
        (base64.b64encode(b"plain text").decode(), "message.data is not valid JSON"),
        (base64.b64encode(b"\xff\xfe{}").decode(), "message.data is not UTF-8"),
        (encode([1, 2, 3]), "message.data must be a JSON object"),
        (encode("a string"), "message.data must be a JSON object"),
        (12345, "message.data must be a base64 string"),
        (encode({"bucket": 5, "name": "folder/Test.cs"}), "message.data failed validation"),
    ],
)
def test_bad_data_is_refused(data: object, reason: str) -> None:
    assert reason in refusal(with_message(data=data)).detail


def test_deeply_nested_data_is_refused() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    error = refusal(with_message(data=base64.b64encode(raw).decode()))
    assert "message.data" in error.detail


def test_json_api_v1_without_data_is_refused() -> None:
    assert "no data" in refusal(with_message(data=None)).detail


def test_invalid_object_field_is_named_without_its_value() -> None:
    data = message_data(sample("pubsub-push-finalize")) | {"size": "huge-secret"}
    error = refusal(with_message(data=encode(data)))
    assert error.problems[0]["field"] == "message.data.size"
    assert "huge-secret" not in str(error.problems)


@pytest.mark.parametrize(
    ("attribute", "value", "field"),
    [
        ("bucketId", "other-bucket", "bucket"),
        ("objectId", "folder/Other.cs", "name"),
        ("objectGeneration", "1587627537231099", "generation"),
    ],
)
def test_attributes_disagreeing_with_the_data_are_refused(
    attribute: str, value: str, field: str
) -> None:
    error = refusal(push(**{attribute: value}))
    assert f"message.data.{field} disagrees with message.attributes" in error.detail


def test_unwrapped_header_disagreeing_with_the_body_is_refused() -> None:
    error = refusal_of(*unwrapped(objectid="folder/Other.cs"))
    assert "body.name disagrees with the attribute headers" in error.detail


def test_unwrapped_body_that_is_not_json_is_refused() -> None:
    headers, _ = unwrapped()
    assert "body is not valid JSON" in refusal_of(headers, b"<html>").detail


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999999999999", "", "١٢٣"])
def test_object_generation_that_is_not_a_generation_is_refused(value: str) -> None:
    assert "objectGeneration" in refusal(push(objectGeneration=value)).detail


@pytest.mark.parametrize("value", ["yesterday", "2020-09-29T11:32:00", "2020-13-45T99:00:00Z"])
def test_unreadable_event_time_is_refused(value: str) -> None:
    assert "eventTime" in refusal(push(eventTime=value)).detail


def test_unreadable_publish_time_is_refused_when_it_is_needed() -> None:
    document = push(eventTime=None)
    document["body"]["message"]["publishTime"] = "soon"
    assert "publishTime" in refusal(document).detail


def test_lone_surrogate_in_attributes_is_refused() -> None:
    headers, body = request(push(objectId="X"))
    body = body.replace(b'"objectId": "X"', b'"objectId": "\\ud800"')
    assert "surrogate" in refusal_of(headers, body).detail


def data_with_name(escaped_name: bytes) -> str:
    """The sample's object resource named by a raw JSON string escape, base64-encoded."""
    data = message_data(sample("pubsub-push-finalize")) | {"name": "X"}
    raw = json.dumps(data).encode().replace(b'"name": "X"', b'"name": "' + escaped_name + b'"')
    return base64.b64encode(raw).decode()


def test_lone_surrogate_in_base64_data_is_refused() -> None:
    document = with_message(data=data_with_name(b"\\udc00"))
    assert "surrogate" in refusal(document).detail


def test_surrogate_pair_in_base64_data_is_text() -> None:
    document = with_message(data=data_with_name(b"\\ud83d\\ude00.png"))
    document["body"]["message"]["attributes"]["objectId"] = "\U0001f600.png"
    event = decode_event(*request(document))
    assert isinstance(event, StorageEvent)
    assert event.object_name == "\U0001f600.png"


def test_huge_object_name_disagreeing_is_refused_briefly() -> None:
    error = refusal(push(objectId="n" * 1_000_000))
    assert "disagrees" in error.detail


def test_message_published_data_that_is_not_the_envelope_is_refused() -> None:
    document = sample("messagepublished-finalize")
    document["body"]["data"] = ["not", "an", "envelope"]
    assert "messagePublished data must be a JSON object" in refusal(document).detail
    document["body"]["data"] = {"bucket": "some-bucket", "name": "x"}
    assert "message is missing" in refusal(document).detail
