"""`POST /` in the OpenAPI document: `/openapi.json` (and so `/docs`) describes where Eventarc
delivers, in both CloudEvents modes, with every answer the route can give; the examples it shows
work, and the route's real answers conform to it (schemathesis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from app.api.openapi import document_event_route
from app.delivery.pipeline import Outcome
from app.events.models import EventType, StorageObjectData
from app.main import create_app
from tests.conftest import outbox_settings, read_outbox
from tests.servers import ThreadedServer

PROBLEM = "application/problem+json"
STRUCTURED = "application/cloudevents+json"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    running = ThreadedServer(outbox_settings(tmp_path))
    document_event_route(running.app)
    with running:
        yield running


@pytest.fixture
def document(server: ThreadedServer) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert answer.status_code == 200
    result: dict[str, Any] = answer.json()
    return result


def resolve(document: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    path = reference["$ref"].removeprefix("#/").split("/")
    target: dict[str, Any] = document
    for part in path:
        target = target[part]
    return target


def event_operation(document: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"]["/"]["post"]
    return operation


def test_the_document_shows_post_slash_beside_the_other_routes(document: dict[str, Any]) -> None:
    assert sorted(document["paths"]) == ["/", "/datetime", "/healthz"]
    assert sorted(document["paths"]["/"]) == ["post"]
    assert event_operation(document)["operationId"] == "receive_event"


def test_binary_mode_is_ce_headers_and_storage_object_data_as_json(
    document: dict[str, Any],
) -> None:
    operation = event_operation(document)
    headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    required = {"ce-id", "ce-source", "ce-specversion", "ce-type"}
    assert required | {"ce-subject", "ce-time", "ce-bucket"} <= headers
    body = operation["requestBody"]["content"]["application/json"]
    data = resolve(document, body["schema"])
    assert data["required"] == ["bucket", "name"]
    fields = {field.alias or name for name, field in StorageObjectData.model_fields.items()}
    assert set(data["properties"]) == fields
    size = data["properties"]["size"]["anyOf"]
    assert {"type": "string", "pattern": "^[0-9]{1,19}$"} in size  # as Cloud Storage sends it
    assert any(choice.get("type") == "integer" for choice in size)
    ce_type = next(p for p in operation["parameters"] if p["name"] == "ce-type")
    for event_type in EventType:
        assert event_type.value in ce_type["description"]


def test_structured_mode_is_one_cloudevents_json_document(document: dict[str, Any]) -> None:
    body = event_operation(document)["requestBody"]["content"][STRUCTURED]
    event = resolve(document, body["schema"])
    assert event["required"] == ["specversion", "id", "source", "type"]
    assert resolve(document, event["properties"]["data"]) == resolve(
        document, {"$ref": "#/components/schemas/StorageObjectData"}
    )


def test_the_eventarc_query_parameter_is_documented(document: dict[str, Any]) -> None:
    [query] = [p for p in event_operation(document)["parameters"] if p["in"] == "query"]
    assert query["name"] == "__GCP_CloudEventsMode"
    assert query["required"] is False


def test_every_answer_of_the_route_is_in_the_table(document: dict[str, Any]) -> None:
    responses = event_operation(document)["responses"]
    assert sorted(responses) == ["200", "400", "401", "403", "408", "409", "413", "503"]
    answer = resolve(document, responses["200"]["content"]["application/json"]["schema"])
    assert answer["required"] == ["status", "id"]
    assert answer["properties"]["status"]["enum"] == [outcome.value for outcome in Outcome]
    for status in ("400", "401", "403", "408", "409", "413", "503"):
        problem = resolve(document, responses[status]["content"][PROBLEM]["schema"])
        assert {"type", "title", "status", "detail"} <= set(problem["properties"])
    for status in ("409", "503"):
        assert "Retry-After" in responses[status]["headers"]
    assert "WWW-Authenticate" in responses["401"]["headers"]
    description = event_operation(document)["description"]
    for word in ("sent", "duplicate", "ignored", "dead-lettered", "409", "503", "413", "Binary"):
        assert word in description


def test_tokens_are_optional_and_bearer(document: dict[str, Any]) -> None:
    operation = event_operation(document)
    assert operation["security"] == [{}, {"eventarcIdToken": []}]
    scheme = document["components"]["securitySchemes"]["eventarcIdToken"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"


def test_docs_page_serves_the_document(server: ThreadedServer) -> None:
    page = httpx.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200
    assert "/openapi.json" in page.text


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_documented_examples_are_notified(
    server: ThreadedServer, document: dict[str, Any], tmp_path: Path, mode: str
) -> None:
    operation = event_operation(document)
    if mode == "binary":
        headers = {
            p["name"]: p["example"] for p in operation["parameters"] if p["name"].startswith("ce-")
        }
        headers["content-type"] = "application/json"
        body = operation["requestBody"]["content"]["application/json"]["example"]
    else:
        headers = {"content-type": STRUCTURED}
        body = operation["requestBody"]["content"][STRUCTURED]["example"]
    query = next(p for p in operation["parameters"] if p["in"] == "query")
    answer = httpx.post(
        f"{server.url}/",
        params={query["name"]: query["example"]},
        headers=headers,
        content=json.dumps(body),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "sent", "id": "1234567890"}
    assert read_outbox(tmp_path / "outbox")


def test_documenting_twice_changes_nothing(tmp_path: Path) -> None:
    app = create_app(outbox_settings(tmp_path))
    document_event_route(app)
    once = json.dumps(app.openapi(), sort_keys=True)
    document_event_route(app)
    assert json.dumps(app.openapi(), sort_keys=True) == once
    assert app.openapi() is app.openapi_schema  # built once, then cached


def test_real_answers_of_post_slash_conform_to_the_document(server: ThreadedServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").include(path_regex=r"^/$")
    operations = list(schema.get_all_operations())
    assert len(operations) == 1
    assert all(isinstance(result, Ok) for result in operations)  # a valid operation
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    session = requests.Session()
    statuses: set[int] = set()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=server.url, session=session)
            statuses.add(response.status_code)
            case.validate_response(response, checks=checks)

        check()
    assert 200 in statuses
    assert 400 in statuses
