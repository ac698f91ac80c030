"""decode_event: an HTTP request's headers and body -> StorageEvent, or a 400's worth of reasons.

CloudEvents HTTP protocol binding 1.0: binary mode carries the attributes in `ce-*` headers,
percent-encoded where needed (section 3.1.3.2), and the data in the body; structured mode carries
the whole event as `application/cloudevents+json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from app.events.decode import EventDecodeError, decode_event
from app.events.models import EventType, StorageEvent, UnhandledEvent
from tests.factories import binary, object_data, structured

Encoder = Callable[..., tuple[dict[str, str], bytes]]
MODES: dict[str, Encoder] = {"binary": binary, "structured": structured}
STRUCTURED = {"content-type": "application/cloudevents+json"}
REQUIRED = ["specversion", "id", "source", "type"]


def storage_event(headers: dict[str, str], body: bytes) -> StorageEvent:
    decoded = decode_event(headers, body)
    assert isinstance(decoded, StorageEvent)
    return decoded


def refusal(headers: dict[str, str], body: bytes) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(headers, body)
    return caught.value


def structured_document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(structured(event_id="evt-1")[1])
    document.update(changes)
    return document


def without(document: dict[str, Any], name: str) -> bytes:
    return json.dumps({key: value for key, value in document.items() if key != name}).encode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("event_type", list(EventType))
def test_each_type_decodes_in_each_mode(mode: str, event_type: EventType) -> None:
    headers, body = MODES[mode](object_data(name="reports/q3.csv"), event_type, "evt-1")
    decoded = storage_event(headers, body)
    assert decoded.type is event_type
    assert decoded.id == "evt-1"
    assert decoded.source == "//storage.googleapis.com/projects/_/buckets/some-bucket"
    assert decoded.subject == "objects/reports/q3.csv"
    assert decoded.specversion == "1.0"
    assert decoded.time == datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC)
    assert decoded.data.name == "reports/q3.csv"
    assert decoded.data.size == 352


def test_binary_mode_reads_the_content_type_as_datacontenttype() -> None:
    headers, body = binary()
    headers["content-type"] = "application/json; charset=utf-8"
    assert storage_event(headers, body).datacontenttype == "application/json; charset=utf-8"


def test_header_names_are_case_insensitive() -> None:
    headers, body = binary(event_id="evt-1")
    shouted = {name.upper(): value for name, value in headers.items()}
    assert storage_event(shouted, body).id == "evt-1"


def test_percent_encoded_headers_are_decoded() -> None:
    headers, body = binary()
    headers["ce-subject"] = "objects/dir/r%C3%A9sum%C3%A9%20final%25.pdf"
    headers["ce-id"] = "evt%2F1"
    headers["ce-bucket"] = "my%20bucket"
    decoded = storage_event(headers, body)
    assert decoded.subject == "objects/dir/résumé final%.pdf"
    assert decoded.id == "evt/1"
    assert decoded.extensions["bucket"] == "my bucket"


@pytest.mark.parametrize("mode", MODES)
def test_eventarc_bucket_extension_is_kept(mode: str) -> None:
    decoded = storage_event(*MODES[mode](object_data(bucket="demo")))
    assert decoded.extensions == {"bucket": "demo"}


def test_other_extensions_are_kept_and_core_attributes_are_not_extensions() -> None:
    headers, body = binary()
    headers["ce-traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    extensions = storage_event(headers, body).extensions
    assert extensions["traceparent"].startswith("00-0af7")
    assert not {"id", "source", "type", "specversion", "subject", "time"} & set(extensions)


def test_nanosecond_event_time_is_truncated_to_microseconds() -> None:
    headers, body = binary()
    headers["ce-time"] = "2020-09-29T11:32:00.123456789Z"
    assert storage_event(headers, body).time == datetime(2020, 9, 29, 11, 32, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_type_is_an_unhandled_event(mode: str) -> None:
    decoded = decode_event(*MODES[mode](event_type="com.example.object.v1.created", event_id="x"))
    assert decoded == UnhandledEvent(
        id="x",
        source="//storage.googleapis.com/projects/_/buckets/some-bucket",
        type="com.example.object.v1.created",
    )


def test_unknown_type_needs_no_storage_data() -> None:
    headers, _ = binary(event_type="com.example.ping")
    headers["content-type"] = "text/plain"
    assert isinstance(decode_event(headers, b"ping"), UnhandledEvent)


def test_plain_json_without_ce_headers_is_not_a_cloud_event() -> None:
    error = refusal({"content-type": "application/json"}, b'{"hello": "world"}')
    assert "not a CloudEvent" in error.detail
    assert "ce-" in error.detail
    assert "application/cloudevents+json" in error.detail
    assert '{"message": {...}, "subscription": ...}' in error.detail
    assert '{"context": {...}, "data": {...}}' in error.detail


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"])
def test_body_that_is_no_json_object_without_ce_headers_is_not_recognised(body: bytes) -> None:
    assert "not a CloudEvent" in refusal({"content-type": "application/json"}, body).detail


def test_storage_object_without_ce_or_attribute_headers_names_write_metadata() -> None:
    error = refusal({"content-type": "application/json"}, json.dumps(object_data()).encode())
    assert "write_metadata" in error.detail


def test_no_headers_at_all_is_not_a_cloud_event() -> None:
    assert "not a CloudEvent" in refusal({}, b"").detail


@pytest.mark.parametrize("attribute", REQUIRED)
def test_binary_mode_names_each_missing_required_header(attribute: str) -> None:
    headers, body = binary()
    del headers[f"ce-{attribute}"]
    error = refusal(headers, body)
    assert f"ce-{attribute}" in error.detail
    assert "missing" in error.detail


def test_binary_mode_names_every_missing_header_at_once() -> None:
    headers, body = binary()
    del headers["ce-id"], headers["ce-source"]
    detail = refusal(headers, body).detail
    assert "ce-id" in detail
    assert "ce-source" in detail


def test_binary_mode_treats_an_empty_required_header_as_missing() -> None:
    headers, body = binary()
    headers["ce-id"] = ""
    assert "ce-id" in refusal(headers, body).detail


@pytest.mark.parametrize(
    "attribute",
    [
        "source",
        "type",
        "id",
        "specversion",
    ],
)
def test_structured_mode_names_each_missing_required_attribute(attribute: str) -> None:
    error = refusal(STRUCTURED, without(structured_document(), attribute))
    assert attribute in error.detail


@pytest.mark.parametrize("mode", MODES)
def test_batch_content_type_is_refused(mode: str) -> None:
    headers, body = MODES[mode]()
    headers["content-type"] = "application/cloudevents-batch+json"
    assert "batch" in refusal(headers, b"[" + body + b"]").detail


def test_invalid_json_body_in_binary_mode_is_refused() -> None:
    headers, _ = binary()
    assert "JSON" in refusal(headers, b'{"bucket": "b", "name": ').detail


def test_invalid_json_body_in_structured_mode_is_refused() -> None:
    assert "not valid JSON" in refusal(STRUCTURED, b'{"specversion": "1.0", ').detail


def test_json_array_body_in_structured_mode_is_refused_as_not_an_object() -> None:
    _, body = structured()
    detail = refusal(STRUCTURED, b"[" + body + b"]").detail
    assert "object" in detail
    assert "attribute 'get'" not in detail


@pytest.mark.parametrize(
    "mode",
    [
        "binary",
        "structured",
    ],
)
def test_invalid_utf8_body_is_refused_as_not_utf8(mode: str) -> None:
    headers, body = MODES[mode](object_data(name="PLACEHOLDER"))
    assert "UTF-8" in refusal(headers, body.replace(b"PLACEHOLDER", b"\xff\xfe")).detail


@pytest.mark.parametrize("mode", MODES)
def test_deeply_nested_json_is_refused(mode: str) -> None:
    headers, _ = MODES[mode]()
    refusal(headers, b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize("value", ["2020-09-29T11:32:00", "not-a-time"])
def test_bad_event_time_is_refused(value: str) -> None:
    headers, body = binary()
    headers["ce-time"] = value
    assert refusal(headers, body).detail.startswith("not a valid CloudEvent")


@pytest.mark.parametrize("value", ["yesterday", "2020-13-45T00:00:00Z"])
def test_bad_event_time_is_refused_naming_the_attribute(value: str) -> None:
    headers, body = binary()
    headers["ce-time"] = value
    assert "time" in refusal(headers, body).detail


def test_naive_event_time_is_refused_naming_the_attribute() -> None:
    headers, body = binary()
    headers["ce-time"] = "2020-09-29T11:32:00"
    detail = refusal(headers, body).detail
    assert "time" in detail
    assert "timezone" in detail


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", ["2.0", "1.1", "banana"])
def test_unsupported_specversion_is_refused(mode: str, version: str) -> None:
    if mode == "binary":
        headers, body = binary()
        headers["ce-specversion"] = version
    else:
        headers, body = STRUCTURED, json.dumps(structured_document(specversion=version)).encode()
    assert "specversion" in refusal(headers, body).detail


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/protobuf"])
def test_non_json_datacontenttype_is_refused(content_type: str) -> None:
    headers, body = binary()
    headers["content-type"] = content_type
    detail = refusal(headers, body).detail
    assert "application/json" in detail
    assert content_type in detail


def test_non_json_datacontenttype_in_structured_mode_is_refused() -> None:
    body = json.dumps(structured_document(datacontenttype="text/csv")).encode()
    assert "text/csv" in refusal(STRUCTURED, body).detail


@pytest.mark.parametrize("data", [[1, 2], "a string", 42, True])
def test_data_that_is_not_an_object_is_refused(data: object) -> None:
    headers, _ = binary()
    detail = refusal(headers, json.dumps(data).encode()).detail
    assert "JSON object" in detail


@pytest.mark.parametrize("data", [[1, 2], "a string", 42])
def test_structured_data_that_is_not_an_object_is_refused(data: object) -> None:
    body = json.dumps(structured_document(data=data)).encode()
    assert "JSON object" in refusal(STRUCTURED, body).detail


@pytest.mark.parametrize("body", [b"", b"null"])
def test_missing_data_in_binary_mode_is_refused(body: bytes) -> None:
    headers, _ = binary()
    assert "no data" in refusal(headers, body).detail


def test_missing_data_in_structured_mode_is_refused() -> None:
    assert "no data" in refusal(STRUCTURED, without(structured_document(), "data")).detail


SECRET_LOOKING = "s3cr3t-input-value-7f1c"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"size": SECRET_LOOKING}, "data.size"),
        ({"generation": SECRET_LOOKING}, "data.generation"),
        ({"metageneration": -1}, "data.metageneration"),
        ({"size": True}, "data.size"),
        ({"componentCount": 2**63}, "data.componentCount"),
        ({"timeCreated": SECRET_LOOKING}, "data.timeCreated"),
        ({"updated": "2020-04-23T07:38:57"}, "data.updated"),
        ({"name": ""}, "data.name"),
        ({"bucket": ""}, "data.bucket"),
        ({"temporaryHold": SECRET_LOOKING}, "data.temporaryHold"),
        ({"metadata": {"owner": 7}}, "data.metadata.owner"),
        ({"metadata": SECRET_LOOKING}, "data.metadata"),
        ({"customerEncryption": {"keySha256": 5}}, "data.customerEncryption.keySha256"),
        ({"contentType": ["text/plain"]}, "data.contentType"),
    ],
)
def test_invalid_data_names_the_field_and_never_the_value(
    mode: str, overrides: dict[str, Any], field: str
) -> None:
    error = refusal(*MODES[mode](object_data(**overrides)))
    assert error.detail == "event data failed validation"
    assert [problem["field"] for problem in error.problems] == [field]
    assert all(problem["message"] for problem in error.problems)
    assert SECRET_LOOKING not in json.dumps(error.problems) + error.detail


@pytest.mark.parametrize("field", ["bucket", "name"])
def test_data_without_bucket_or_name_is_refused(field: str) -> None:
    data = object_data()
    del data[field]
    headers, body = binary(data)
    [problem] = refusal(headers, body).problems
    assert problem == {"field": f"data.{field}", "message": "Field required"}


def test_every_invalid_field_is_reported_at_once() -> None:
    headers, body = binary(object_data(size=-5, generation=True, timeCreated="2020-01-01T00:00:00"))
    fields = {problem["field"] for problem in refusal(headers, body).problems}
    assert fields == {"data.size", "data.generation", "data.timeCreated"}


def test_decode_error_is_a_value_error() -> None:
    assert isinstance(EventDecodeError("x"), ValueError)
