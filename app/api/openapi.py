"""`POST /` in the OpenAPI document (`/openapi.json`, `/docs`).

The event route is a plain Starlette route (app/api/events.py: FastAPI's parameter solving would
cost time on the path that carries the load), so FastAPI leaves it out of the document. This
module writes it in: both CloudEvents HTTP modes (binary: `ce-*` headers and the
StorageObjectData as the JSON body, what Eventarc sends; structured: the whole event as
`application/cloudevents+json`), the query Eventarc adds to the push URL, the tokens
`EVENT_AUTH=oidc|iam` check, and every answer app/api/errors.py can give it.

The document is built on its first request, like FastAPI's own: the event models and outcomes it
describes are imported then, so start-up still loads no part of the event path (app/runtime.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from app.api.body import BODY_TIMEOUT_SECONDS
from app.config import MAX_EVENT_BYTES

PROBLEM = "application/problem+json"
STRUCTURED = "application/cloudevents+json"
SCHEMAS = "#/components/schemas/"
TOKEN_SCHEME = "eventarcIdToken"
INT64_MAX = 2**63 - 1
FINALIZED = "google.cloud.storage.object.v1.finalized"

_EXAMPLE_DATA: dict[str, Any] = {
    "kind": "storage#object",
    "id": "my-bucket/reports/q3.csv/1587627537231057",
    "name": "reports/q3.csv",
    "bucket": "my-bucket",
    "generation": "1587627537231057",
    "metageneration": "1",
    "contentType": "text/csv",
    "timeCreated": "2020-04-23T07:38:57.230Z",
    "updated": "2020-04-23T07:38:57.230Z",
    "storageClass": "STANDARD",
    "size": "352",
    "md5Hash": "kF8MuJ5+CTJxvyhHS1xzRg==",
    "crc32c": "rTVTeQ==",
    "etag": "CNHZkbuF/ugCEAE=",
}

_ANSWERS_TABLE = """\
| situation | answer |
| --- | --- |
| notified | `200 {"status": "sent", "id": …}` |
| notified, done mark not stored yet (retried while the claim lasts) | `200 {…, "unconfirmed": 1}` |
| already notified (a redelivery, or the change published twice) | `200 {"status": "duplicate"}` |
| a CloudEvent of a type this service does not handle | `200 {"status": "ignored"}` |
| rules: no route matched / a `drop` route matched | `200 {"status": "ignored"}` / `"dropped"` |
| held for a digest: stored, sent when its window closes | `200 {"status": "digested"}` |
| the email provider rejected the message for good | `200 {"status": "dead-lettered"}` |
| not a CloudEvent, a missing attribute, invalid JSON, data failing validation | `400` |
| no or bad token / a token of another account (`EVENT_AUTH=oidc` or `iam`) | `401` / `403` |
| body not received within 30 s | `408` |
| the same change is being sent right now by another delivery | `409` + `Retry-After` |
| body over 512 KiB | `413` |
| email provider, delivery state or token certificates unavailable | `503` + `Retry-After` |
| a send whose outcome is unknown (its claim stands until its lease ends) | `503` + `Retry-After` |
"""

_DESCRIPTION = f"""\
Where Eventarc delivers Cloud Storage events, as CloudEvents 1.0 over HTTP.

**Binary mode** (what Eventarc sends): the event's attributes in `ce-*` headers
(`ce-id`, `ce-source`, `ce-specversion` and `ce-type` required) and the object,
a `StorageObjectData`, as the `application/json` body.
**Structured mode**: the whole event, attributes and `data`, as one
`{STRUCTURED}` document (what `python -m app.replay` sends).

The same change is also accepted as Google's other deliveries carry it (README, "Every way a
change arrives"): an Eventarc Pub/Sub trigger's `google.cloud.pubsub.topic.v1.messagePublished`
CloudEvent; a Pub/Sub push of a Cloud Storage notification, `{{"message": {{"attributes",
"data", "messageId", "publishTime"}}, "subscription"}}`, or unwrapped (the object as the body,
the attributes as headers: write metadata on); a 1st-gen background event,
`{{"context", "data"}}` or flat. A message recognised but of no use here (another topic, an
unknown event type) is answered `200 {{"status": "ignored"}}`, so Pub/Sub does not retry it.

Each storage change is notified once: deduplication is on type, bucket, object name,
generation and metageneration, not on the message id. Answers are chosen for Eventarc,
which delivers again anything not answered 102, 200, 201, 202 or 204, for 24 hours:

{_ANSWERS_TABLE}
Errors are RFC 9457 problem documents (`{PROBLEM}`) that never echo request headers.
"""


def document_event_route(app: FastAPI) -> None:
    """Make `app.openapi()` (and so `/openapi.json` and `/docs`) include `POST /`.

    It wraps the generator FastAPI gave the app, which caches its document in
    `app.openapi_schema`: the route is added to that cached document once. Calling this twice
    changes nothing more."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()
        if "post" not in document.setdefault("paths", {}).get("/", {}):
            add_event_route(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def add_event_route(document: dict[str, Any]) -> None:
    """Write `POST /` and the schemas it refers to into an OpenAPI 3.1 document."""
    # The event path, imported on the first request for the document, not at start-up.
    from app.delivery.pipeline import Outcome
    from app.events.models import EventType, StorageObjectData

    event_types = [member.value for member in EventType]
    outcomes = [outcome.value for outcome in Outcome]
    data = StorageObjectData.model_json_schema(by_alias=True, ref_template=SCHEMAS + "{model}")
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_schemas(data, event_types, outcomes))
    components.setdefault("securitySchemes", {})[TOKEN_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": (
            "A Google-signed ID token whose `email` is one of `EVENT_INVOKERS` and whose audience"
            " is the service (`EVENT_AUDIENCE`): Eventarc sends the trigger's service account's"
            " token. Checked only with `EVENT_AUTH=oidc` (the service verifies the signature) or"
            " `EVENT_AUTH=iam` (Cloud Run IAM verified it and removed the signature; a token in"
            " `X-Serverless-Authorization` is then the one checked)."
        ),
    }
    document.setdefault("paths", {}).setdefault("/", {})["post"] = _operation(event_types, outcomes)


def _ce_headers(event_types: list[str]) -> list[tuple[str, str, dict[str, Any], str]]:
    """Name, description, schema and example of each binary-mode header."""
    return [
        ("ce-id", "The message id; redeliveries keep it.", {"type": "string"}, "1234567890"),
        (
            "ce-source",
            "The bucket: `//storage.googleapis.com/projects/_/buckets/BUCKET`.",
            {"type": "string"},
            "//storage.googleapis.com/projects/_/buckets/my-bucket",
        ),
        ("ce-specversion", "CloudEvents version.", {"type": "string", "enum": ["1.0"]}, "1.0"),
        (
            "ce-type",
            "The event type: "
            + ", ".join(f"`{event_type}`" for event_type in event_types)
            + ". Another type is answered `200 ignored`.",
            {"type": "string"},
            FINALIZED,
        ),
        (
            "ce-subject",
            "`objects/NAME`, slashes kept.",
            {"type": "string"},
            "objects/reports/q3.csv",
        ),
        (
            "ce-time",
            "When the change happened (RFC 3339).",
            {"type": "string", "format": "date-time"},
            "2020-04-23T07:38:57.230Z",
        ),
        (
            "ce-bucket",
            "The bucket (an Eventarc extension attribute).",
            {"type": "string"},
            "my-bucket",
        ),
    ]


def _operation(event_types: list[str], outcomes: list[str]) -> dict[str, Any]:
    return {
        "summary": "Receive a Cloud Storage event from Eventarc",
        "description": _DESCRIPTION,
        "operationId": "receive_event",
        "parameters": [
            {
                "name": "__GCP_CloudEventsMode",
                "in": "query",
                "required": False,
                "description": (
                    "Added by Eventarc to the push URL (`GCS_NOTIFICATION` for Cloud Storage"
                    " triggers). Read by nobody: any value, and any other query, is accepted."
                ),
                "schema": {"type": "string"},
                "example": "GCS_NOTIFICATION",
            },
            *(
                {
                    "name": name,
                    "in": "header",
                    "required": False,  # binary mode only
                    "description": f"Binary mode. {description}",
                    "schema": schema,
                    "example": example,
                }
                for name, description, schema, example in _ce_headers(event_types)
            ),
            {
                "name": "X-Serverless-Authorization",
                "in": "header",
                "required": False,
                "description": (
                    "`EVENT_AUTH=iam`: `Bearer` and the ID token Cloud Run IAM checked instead of"
                    " `Authorization`, which is then ignored."
                ),
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "description": f"At most {MAX_EVENT_BYTES // 1024} KiB (Eventarc's maximum).",
            "content": {
                "application/json": {
                    "schema": {"$ref": SCHEMAS + "StorageObjectData"},
                    "example": _EXAMPLE_DATA,
                },
                STRUCTURED: {
                    "schema": {"$ref": SCHEMAS + "StorageCloudEvent"},
                    "example": {
                        "specversion": "1.0",
                        "id": "1234567890",
                        "source": "//storage.googleapis.com/projects/_/buckets/my-bucket",
                        "type": FINALIZED,
                        "subject": "objects/reports/q3.csv",
                        "time": "2020-04-23T07:38:57.230Z",
                        "datacontenttype": "application/json",
                        "bucket": "my-bucket",
                        "data": _EXAMPLE_DATA,
                    },
                },
            },
        },
        "security": [{}, {TOKEN_SCHEME: []}],  # none with EVENT_AUTH=none
        "responses": _responses(outcomes),
    }


def _responses(outcomes: list[str]) -> dict[str, Any]:
    retry_after = {
        "Retry-After": {
            "description": "Seconds to wait before delivering again",
            "schema": {"type": "integer", "minimum": 1},
        }
    }

    def problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM: {"schema": {"$ref": SCHEMAS + "Problem"}}},
        }
        if headers:
            answer["headers"] = headers
        return answer

    return {
        "200": {
            "description": (
                "Done with this event, nothing to deliver again: `sent` (notified), `duplicate`"
                " (this change was already notified), `ignored` (a type this service does not"
                " handle, or no route matched), `dropped` (a `drop` route matched),"
                " `digested` (held for a digest: stored, sent when its window closes),"
                " `dead-lettered` (the email provider rejected the message for good;"
                " the event is kept in `DEAD_LETTER_DIR` for `python -m app.replay`)."
            ),
            "content": {
                "application/json": {
                    "schema": {"$ref": SCHEMAS + "EventAnswer"},
                    "examples": {
                        outcome: {"value": {"status": outcome, "id": "1234567890"}}
                        for outcome in outcomes
                    },
                }
            },
        },
        "400": problem(
            "Not a CloudEvent, a missing attribute, invalid JSON, or data failing validation;"
            " `errors` lists each problem. Never accepted as sent."
        ),
        "401": problem(
            "No token, or one that is not valid (`EVENT_AUTH=oidc` or `iam`).",
            {"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        "403": problem("A valid token of an account not in `EVENT_INVOKERS`."),
        "408": problem(
            f"The body did not arrive within {BODY_TIMEOUT_SECONDS:g} s.",
            {"Connection": {"schema": {"type": "string", "enum": ["close"]}}},
        ),
        "409": problem(
            "The same change is being sent right now by another delivery: deliver again later.",
            retry_after,
        ),
        "413": problem(f"The body exceeds {MAX_EVENT_BYTES // 1024} KiB."),
        "503": problem(
            "Not now, deliver again later: the email provider is down, slow, rate-limiting or"
            " refusing the service's key; the delivery state or Google's token certificates"
            " cannot be reached; or the service is shutting down.",
            retry_after,
        ),
    }


def _schemas(data: dict[str, Any], event_types: list[str], outcomes: list[str]) -> dict[str, Any]:
    """`data`: StorageObjectData's JSON schema, its references under `SCHEMAS`."""
    nested = data.pop("$defs", {})
    for name, field in data["properties"].items():
        data["properties"][name] = _int64_as_sent(field)
    return {
        **nested,
        "StorageObjectData": data,
        "StorageCloudEvent": {
            "type": "object",
            "description": "A CloudEvent in structured mode: its attributes and `data`.",
            "required": ["specversion", "id", "source", "type"],
            "properties": {
                "specversion": {"type": "string", "enum": ["1.0"]},
                "id": {"type": "string"},
                "source": {"type": "string"},
                "type": {"type": "string", "examples": event_types},
                "subject": {"type": "string"},
                "time": {"type": "string", "format": "date-time"},
                "datacontenttype": {"type": "string", "examples": ["application/json"]},
                "data": {"$ref": SCHEMAS + "StorageObjectData"},
            },
            "additionalProperties": True,  # extension attributes, e.g. `bucket`
        },
        "EventAnswer": {
            "type": "object",
            "required": ["status", "id"],
            "properties": {
                "status": {"type": "string", "enum": outcomes},
                "id": {"type": "string", "description": "The event's id (`ce-id`)."},
                "unconfirmed": {
                    "type": "integer",
                    "description": (
                        "Emails the provider accepted whose done marks the store has not taken"
                        " yet (retried while their claims last); absent when none."
                    ),
                },
            },
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        },
    }


def _int64_as_sent(field: dict[str, Any]) -> dict[str, Any]:
    """Cloud Storage writes int64 fields as decimal strings (proto3 JSON); numbers are accepted
    too. Pydantic describes them as integers only."""
    if "anyOf" not in field:
        return field
    choices: list[dict[str, Any]] = []
    for choice in field["anyOf"]:
        if choice.get("type") == "integer":
            choices += [
                {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
                {"type": "string", "pattern": "^[0-9]{1,19}$"},
            ]
        else:
            choices.append(choice)
    return {**field, "anyOf": choices}
