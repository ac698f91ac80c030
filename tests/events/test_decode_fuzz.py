"""Whatever JSON arrives without ce- headers, decode_event returns an event or raises
EventDecodeError, never anything else; and every StorageEvent it returns is one that can be
written out (UTF-8, change_key, a storage source)."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.events.change import SOURCE
from app.events.decode import decode_event
from app.events.errors import EventDecodeError
from app.events.legacy import EVENT_TYPES as LEGACY_TYPES
from app.events.legacy import OBJECT_CHANGE
from app.events.models import StorageEvent, UnhandledEvent
from app.events.pubsub import ATTRIBUTES, EVENT_TYPES, MESSAGE_PUBLISHED
from tests.events.payloads import message_data, request, sample

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
JSON_HEADERS = {"content-type": "application/json"}
OBJECT = message_data(sample("pubsub-push-finalize"))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
# Values that look almost right: the documented ones, near misses, and junk.
plausible_text = st.sampled_from(
    [
        *EVENT_TYPES,
        *LEGACY_TYPES,
        OBJECT_CHANGE,
        "JSON_API_V1",
        "NONE",
        "some-bucket",
        "folder/Test.cs",
        "1587627537231057",
        "-1",
        "2020-09-29T11:32:00.123Z",
        "2020-09-29T11:32:00",
        "projects/_/buckets/some-bucket/objects/folder/Test.cs#1587627537231057",
        "projects/p/buckets/b",
        "not_exists",
        "",
        "\ud800",
    ]
) | st.text(max_size=20)
values = plausible_text | json_values
object_like = st.fixed_dictionaries(
    {}, optional=dict.fromkeys(["bucket", "name", "generation", "metageneration", "size"], values)
).map(lambda changes: OBJECT | changes)
base64_data = (
    object_like.map(lambda data: base64.b64encode(json.dumps(data).encode()).decode())
    | json_values.map(lambda data: base64.b64encode(json.dumps(data).encode()).decode())
    | st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode())
    | values
)
attributes = st.dictionaries(st.sampled_from(ATTRIBUTES) | st.text(max_size=8), values, max_size=8)
messages = st.fixed_dictionaries(
    {},
    optional={
        "attributes": attributes | values,
        "data": base64_data,
        "messageId": values,
        "message_id": values,
        "publishTime": values,
        "publish_time": values,
    },
)
pushes = st.fixed_dictionaries({"message": messages | values}, optional={"subscription": values})
contexts = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(["eventId", "timestamp", "eventType", "resource"], values),
)
resources = st.fixed_dictionaries({}, optional={"name": values, "service": values}) | values
background = st.fixed_dictionaries(
    {"context": contexts | values}, optional={"data": object_like | values}
) | st.fixed_dictionaries(
    {},
    optional={
        "eventId": values,
        "eventType": values,
        "resource": resources,
        "timestamp": values,
        "data": object_like | values,
    },
)
bodies = pushes | background | object_like | json_values


def encode(body: Any) -> bytes:
    # ensure_ascii writes a lone surrogate as an escape, as a hostile sender could.
    return json.dumps(body).encode()


def decoded_or_refused(
    headers: dict[str, str], body: bytes
) -> StorageEvent | UnhandledEvent | EventDecodeError:
    try:
        event = decode_event(headers, body)
    except EventDecodeError as error:
        refused = error
    else:
        if isinstance(event, StorageEvent):
            assert event.source.startswith(SOURCE)
            assert event.change_key().encode()
            assert event.model_dump_json().encode()
        else:
            assert isinstance(event, UnhandledEvent)
            assert (event.id + event.source + event.type).encode()
        return event
    assert refused.detail
    assert "\n" not in refused.detail
    return refused


@FUZZ
@given(bodies)
def test_any_json_body_without_ce_headers_decodes_or_is_refused(body: Any) -> None:
    decoded_or_refused(dict(JSON_HEADERS), encode(body))


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_without_ce_headers_decode_or_are_refused(body: bytes) -> None:
    decoded_or_refused(dict(JSON_HEADERS), body)


header_values = st.text(st.characters(max_codepoint=255), max_size=30) | st.sampled_from(
    ["OBJECT_FINALIZE", "NONE", "JSON_API_V1", "some-bucket", "folder/Test.cs", "12"]
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                *(name.lower() for name in ATTRIBUTES),
                "x-goog-pubsub-message-id",
                "x-goog-pubsub-publish-time",
                "x-goog-pubsub-subscription-name",
            ]
        ),
        header_values,
    ),
    object_like.map(encode) | st.binary(max_size=100),
)
def test_any_unwrapped_push_decodes_or_is_refused(headers: dict[str, str], body: bytes) -> None:
    decoded_or_refused(headers, body)


@FUZZ
@given(pushes | values)
def test_any_message_published_data_decodes_or_is_refused(data: Any) -> None:
    document = sample("messagepublished-finalize")
    document["body"]["data"] = data
    headers, body = request(document)
    outcome = decoded_or_refused(headers, body)
    if isinstance(outcome, UnhandledEvent):
        assert outcome.type == MESSAGE_PUBLISHED or outcome.type.startswith("pubsub:")
