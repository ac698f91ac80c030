"""Hostile input (issue 4, item 5): whatever arrives at `POST /` or `/datetime`, the service answers
below 500, shows no traceback, never echoes the caller's bearer token, and stays up.

One real server serves the whole module; hypothesis throws random headers, content types, query
strings and bodies at it, and schemathesis checks `/datetime` and `/healthz` against the app's own
OpenAPI document.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok

from app.events.models import EventType, StorageObjectData
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary, object_data, structured
from tests.servers import ThreadedServer

EXAMPLES = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRACEBACK_MARKERS = ("Traceback", 'File "')
PROBLEM = "application/problem+json"

# Headers that decide how the request is framed; random values there test httpx, not the service.
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
CE_ATTRIBUTES = ["specversion", "id", "source", "type", "subject", "time", "bucket"]
CE_ATTRIBUTES += ["datacontenttype", "dataschema", "data", "traceparent"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/cloudevents+json",
    "application/cloudevents+json; charset=utf-16",
    "application/cloudevents-batch+json",
    "APPLICATION/CLOUDEVENTS+JSON",
    "text/json",
    "text/plain",
    "application/xml",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/vnd.api+json",
    "*/*",
    ";;;",
    "",
]
ACCEPTS = ["application/json", "text/plain", "*/*", "text/html", "application/json;q=0", ""]
FIELDS = sorted(
    field.alias or name for name, field in StorageObjectData.model_fields.items()
)  # every field of Google's schema, as sent (camelCase)


class Secret:
    """A bearer token sent with every request; it must never come back."""

    def __init__(self) -> None:
        self.value = f"tok_{secrets.token_hex(20)}"

    @property
    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}

    def with_headers(self, headers: Mapping[str, str | bytes]) -> list[tuple[bytes, bytes]]:
        """`headers` as sent on the wire (latin-1, names may repeat), plus the bearer token."""
        pairs = [
            (name.encode(), value if isinstance(value, bytes) else value.encode("latin-1"))
            for name, value in headers.items()
        ]
        return [*pairs, (b"authorization", f"Bearer {self.value}".encode())]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(outbox_settings(tmp_path_factory.mktemp("hostile"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def assert_safe(response: httpx.Response, secret: Secret) -> None:
    assert response.status_code < 500, response.text
    body = response.text
    for marker in TRACEBACK_MARKERS:
        assert marker not in body
    assert secret.value not in body
    assert all(secret.value not in value for value in response.headers.values())
    if 400 <= response.status_code < 500:
        assert response.headers["content-type"] == PROBLEM
        assert isinstance(response.json()["detail"], str)


def assert_healthy(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def nesting_depth(body: bytes) -> int:
    depth = deepest = 0
    for byte in body:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def has_surrogate(document: object) -> bool:
    pending = [document]  # a loop, not recursion: documents may nest thousands deep
    while pending:
        value = pending.pop()
        if isinstance(value, str) and any("\ud800" <= char <= "\udfff" for char in value):
            return True
        if isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value
    return False


def known_server_error(body: bytes) -> bool:
    """Inputs that still make the app answer 500, each pinned by a strict xfail test below.
    Delete a clause once its bug is fixed, so the property tests cover those inputs again."""
    if nesting_depth(body) > 200:
        return False  # the deep documents hold no strings, and json.loads would hit its limit
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return has_surrogate(document)  # "\ud800" in JSON: UnicodeEncodeError when answering


# --- strategies -------------------------------------------------------------------------------

header_values = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\r\n\x00\x7f", min_codepoint=0x20)
    | st.just("\t"),
    max_size=60,
).map(lambda text: text.strip(" \t").encode("latin-1"))
percent_encoded = st.sampled_from(["%ff", "%ED%A0%80", "%00", "%0D%0A", "%", "%zz", "a%20b"])
header_names = st.one_of(
    st.sampled_from([f"ce-{name}" for name in CE_ATTRIBUTES]),
    st.from_regex(r"ce-[A-Za-z0-9_.-]{0,16}", fullmatch=True),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
    st.sampled_from(["Content-Type", "Accept", "X-Cloud-Trace-Context", "Content-Encoding"]),
).filter(lambda name: name.lower() not in FRAMING and name.lower() != "authorization")
random_headers = st.dictionaries(
    header_names,
    header_values | percent_encoded.map(str.encode),
    max_size=12,
)
content_types = st.sampled_from(CONTENT_TYPES) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from([2**63, -(2**63) - 1, 10**30, "1e400", "-1", "0x10", "", "  ", "NaN"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=1, max_value=20_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    return opener * depth + b"1" + closer * depth


@st.composite
def huge_numbers(draw: st.DrawFn) -> bytes:
    number = draw(
        st.sampled_from(
            [b"1e400", b"-1e400", b"1" + b"0" * 5000, b"9" * 4301, b"1.5e-400", b"NaN", b"Infinity"]
        )
        | st.integers().map(lambda value: str(value).encode())
    )
    field = draw(st.sampled_from(FIELDS)).encode()
    return b'{"bucket": "b", "name": "n", "' + field + b'": ' + number + b"}"


def invalid_utf8(raw: bytes) -> bytes:
    return b'{"bucket": "b", "name": "' + raw + b'\xff\xfe\xc3"}'


bodies = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=200).map(invalid_utf8),
    deeply_nested(),
    huge_numbers(),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@st.composite
def mutated_events(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    """A real event with one field of its data (or an attribute) replaced by something else."""
    data = object_data(name=draw(st.text(min_size=1, max_size=200)))
    binary_mode = draw(st.booleans())
    event_type = draw(st.sampled_from([*list(EventType), "com.example.other"]))
    headers, body = (binary if binary_mode else structured)(data, event_type)
    document = json.loads(body)
    (document if binary_mode else document["data"])[draw(st.sampled_from(FIELDS))] = draw(
        json_values
    )
    if draw(st.booleans()):
        attribute = draw(st.sampled_from(["id", "source", "type", "time", "subject", "bucket"]))
        if binary_mode:
            headers[f"ce-{attribute}"] = draw(
                st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
            )
        else:
            document[attribute] = draw(json_values)
    return headers, json.dumps(document, ensure_ascii=False).encode()


# --- POST / -----------------------------------------------------------------------------------


def test_random_headers_and_bodies_at_the_event_route(client: httpx.Client) -> None:
    @EXAMPLES
    @given(
        headers=random_headers,
        content_type=st.none() | content_types,
        body=bodies,
        path=st.sampled_from(["/", EVENTARC_PATH, "/?a=%ff&b", "/?" + "x" * 300]),
    )
    def check(headers: dict[str, bytes], content_type: str | None, body: bytes, path: str) -> None:
        assume(not known_server_error(body))
        secret = Secret()
        sent: dict[str, str | bytes] = {**headers}
        if content_type is not None:
            sent["Content-Type"] = content_type
        assert_safe(client.post(path, headers=secret.with_headers(sent), content=body), secret)

    check()
    assert_healthy(client)


def test_events_with_a_wrong_value_in_any_field(client: httpx.Client) -> None:
    @EXAMPLES
    @given(event=mutated_events())
    def check(event: tuple[dict[str, str], bytes]) -> None:
        headers, body = event
        assume(not known_server_error(body))
        secret = Secret()
        response = client.post(EVENTARC_PATH, headers=secret.with_headers(headers), content=body)
        assert_safe(response, secret)
        if response.is_success:
            assert response.json()["status"] in {"sent", "duplicate", "ignored"}

    check()
    assert_healthy(client)


def test_random_unicode_object_names_are_notified_or_refused(client: httpx.Client) -> None:
    @EXAMPLES
    @given(name=st.text(min_size=0, max_size=1100), structured_mode=st.booleans())
    def check(name: str, structured_mode: bool) -> None:
        encoder = structured if structured_mode else binary
        headers, body = encoder(object_data(name=name))
        secret = Secret()
        response = client.post(EVENTARC_PATH, headers=secret.with_headers(headers), content=body)
        assert_safe(response, secret)
        assert response.status_code in {200, 400}
        if name:
            assert response.status_code == 200

    check()
    assert_healthy(client)


# --- /datetime --------------------------------------------------------------------------------

query_texts = st.text(max_size=120)
queries = st.lists(
    st.tuples(
        st.sampled_from(["requester", "tz", "x", "requester[]", ""]) | st.text(max_size=8),
        query_texts | st.sampled_from(["Europe/Paris", "UTC", "../etc", "x" * 101]),
    ),
    max_size=5,
)


def test_random_queries_and_bodies_at_datetime(client: httpx.Client) -> None:
    @EXAMPLES
    @given(
        method=st.sampled_from(["GET", "POST"]),
        query=queries,
        raw_query=st.none()
        | st.text(
            alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"),
            max_size=80,
        ),
        headers=random_headers,
        accept=st.sampled_from(ACCEPTS),
        body=bodies | json_values.map(lambda value: json.dumps({"requester": value}).encode()),
    )
    def check(
        method: str,
        query: list[tuple[str, str]],
        raw_query: str | None,
        headers: dict[str, bytes],
        accept: str,
        body: bytes,
    ) -> None:
        if method == "POST":
            assume(not known_server_error(body))
        secret = Secret()
        url = f"/datetime?{raw_query}" if raw_query else "/datetime"
        response = client.request(
            method,
            url,
            params=None if raw_query else tuple(query),
            headers=secret.with_headers({**headers, "Accept": accept}),
            content=body if method == "POST" else None,
        )
        assert_safe(response, secret)
        assert response.status_code in {200, 400, 413}

    check()
    assert_healthy(client)


# --- inputs that answered 500: fixed ones stay as regressions, open ones are strict xfails -----


def post_once(
    server: ThreadedServer, path: str, headers: dict[str, str], body: bytes
) -> httpx.Response:
    """One request on a fresh connection (uvicorn drops a connection after a 500), then a health
    check: once that answers, the server thread has finished logging the request's traceback.
    (CPython 3.11 keeps the AST builder's depth counter in shared state, so a traceback formatted
    in the server thread while pytest formats one here can fail with "AST constructor recursion
    depth mismatch".)"""
    response = httpx.post(server.url + path, headers=headers, content=body, timeout=10)
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    return response


def with_surrogate(body: bytes) -> bytes:
    return body.replace(b"PLACEHOLDER", b"\\ud800")


@pytest.mark.parametrize("encoder", [binary, structured], ids=["binary", "structured"])
def test_deeply_nested_json_event_is_a_400(server: ThreadedServer, encoder: Any) -> None:
    headers, _ = encoder()
    secret = Secret()
    body = b"[" * 5000 + b"]" * 5000
    assert_safe(post_once(server, "/", {**headers, **secret.header}, body), secret)


@pytest.mark.xfail(strict=True, reason="app bug: a lone surrogate in event data -> 500")
@pytest.mark.parametrize(
    ("encoder", "field"),
    [(binary, "contentType"), (binary, "storageClass"), (structured, "contentType")],
    ids=["binary-contentType", "binary-storageClass", "structured-contentType"],
)
def test_lone_surrogate_in_event_data_is_not_a_500(
    server: ThreadedServer, encoder: Any, field: str
) -> None:
    headers, body = encoder(object_data(**{field: "PLACEHOLDER"}))
    secret = Secret()
    response = post_once(server, "/", {**headers, **secret.header}, with_surrogate(body))
    assert_safe(response, secret)


@pytest.mark.xfail(strict=True, reason="app bug: a lone surrogate in metadata -> 500")
def test_lone_surrogate_in_event_metadata_is_not_a_500(server: ThreadedServer) -> None:
    headers, body = binary(object_data(metadata={"owner": "PLACEHOLDER"}))
    secret = Secret()
    response = post_once(server, "/", {**headers, **secret.header}, with_surrogate(body))
    assert_safe(response, secret)


@pytest.mark.xfail(strict=True, reason="app bug: a lone surrogate in a structured event id -> 500")
def test_lone_surrogate_in_a_structured_event_id_is_not_a_500(server: ThreadedServer) -> None:
    headers, body = structured(event_id="PLACEHOLDER")
    secret = Secret()
    response = post_once(server, "/", {**headers, **secret.header}, with_surrogate(body))
    assert_safe(response, secret)


@pytest.mark.xfail(strict=True, reason="app bug: a lone surrogate requester -> 500")
def test_lone_surrogate_requester_is_not_a_500(server: ThreadedServer) -> None:
    secret = Secret()
    body = with_surrogate(b'{"requester": "PLACEHOLDER"}')
    assert_safe(post_once(server, "/datetime", secret.header, body), secret)


# --- schemathesis against the OpenAPI document -------------------------------------------------


def test_datetime_and_healthz_conform_to_the_openapi_document(server: ThreadedServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").include(
        path_regex=r"^/(datetime|healthz)$"
    )
    operations = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in operations)  # the document itself is valid
    labels = sorted(result.ok().label for result in operations if isinstance(result, Ok))
    assert labels == ["GET /datetime", "GET /healthz", "POST /datetime"]
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    session = requests.Session()
    secret = Secret()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=server.url, session=session, headers=secret.header)
            case.validate_response(response, checks=checks)
            assert secret.value not in response.text
            assert "Traceback" not in response.text

        check()
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
