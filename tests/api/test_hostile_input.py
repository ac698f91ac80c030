"""Hostile input (issue 4, item 5): whatever arrives at `POST /` or `/datetime`, the service answers
below 500, shows no traceback, never echoes the caller's bearer token, and stays up.

One real server serves the whole module; hypothesis throws random headers, content types, query
strings and bodies at it, and schemathesis checks `/datetime` and `/healthz` against the app's own
OpenAPI document.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from app.events.models import StorageObjectData
from tests.conftest import outbox_settings
from tests.factories import binary, object_data, structured
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


# --- inputs that once answered 500, kept as regressions ---------------------------------------


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


def test_lone_surrogate_in_event_metadata_is_not_a_500(server: ThreadedServer) -> None:
    headers, body = binary(object_data(metadata={"owner": "PLACEHOLDER"}))
    secret = Secret()
    response = post_once(server, "/", {**headers, **secret.header}, with_surrogate(body))
    assert_safe(response, secret)


def test_lone_surrogate_in_a_structured_event_id_is_not_a_500(server: ThreadedServer) -> None:
    headers, body = structured(event_id="PLACEHOLDER")
    secret = Secret()
    response = post_once(server, "/", {**headers, **secret.header}, with_surrogate(body))
    assert_safe(response, secret)


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
