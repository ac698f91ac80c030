"""POST / : where Eventarc delivers Cloud Storage events (`/?__GCP_CloudEventsMode=...` too)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from app.api.body import read_body
from app.api.deps import PipelineDep, VerifierDep
from app.delivery.pipeline import Outcome
from app.events.decode import decode_event
from app.events.models import UnhandledEvent

log = logging.getLogger(__name__)

router = APIRouter()

_EVENT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A Cloud Storage CloudEvent, binary mode (ce-* headers, JSON data) or "
        "structured mode (application/cloudevents+json).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/cloudevents+json": {"schema": {"type": "object"}},
        },
    }
}


@router.post(
    "/",
    summary="Receive a Cloud Storage event from Eventarc",
    openapi_extra=_EVENT_DOC,
    status_code=200,
)
async def receive_event(
    request: Request, pipeline: PipelineDep, verifier: VerifierDep
) -> JSONResponse:
    if verifier is not None:
        # Before the body is read: strangers cost us a header check, nothing more.
        await verifier.verify(request.headers.get("authorization"), str(request.url))
    body = await read_body(request)
    event = decode_event(request.headers, body)
    if isinstance(event, UnhandledEvent):
        # Answer 2xx: any other status makes Eventarc retry it for 24 hours.
        log.warning(
            "event type not handled, ignored",
            extra={"event_id": event.id, "event_type": event.type, "source": event.source},
        )
        return JSONResponse({"status": Outcome.IGNORED.value, "id": event.id})
    result = await pipeline.handle(event)
    return JSONResponse({"status": result.outcome.value, "id": result.event_id})
