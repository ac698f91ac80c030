"""GET|POST /datetime: the book's HTTP function, a greeting with today's date and the time."""

from __future__ import annotations

import json
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app.api.body import read_body
from app.api.errors import BadRequest

router = APIRouter()

MAX_REQUESTER = 100
MAX_BODY = 4096

Requester = Annotated[
    str | None, Query(max_length=MAX_REQUESTER, description="Who to greet (default: anonymous)")
]
TimeZone = Annotated[
    str | None, Query(max_length=64, description="IANA time zone, e.g. Europe/Paris (default: UTC)")
]


def greeting(requester: str, now: datetime, zone_name: str = "UTC") -> dict[str, str]:
    """`timezone` is the IANA name asked for; the message uses the local abbreviation."""
    abbreviation = now.tzname() or zone_name
    date, time = now.strftime("%Y-%m-%d"), now.strftime("%H:%M:%S")
    return {
        "requester": requester,
        "date": date,
        "time": time,
        "timezone": zone_name,
        "timestamp": now.isoformat(timespec="seconds"),
        "message": (
            f"Hello {requester}! Today is {now:%A, %d %B %Y} and the time is {time} {abbreviation}."
        ),
    }


def _zone(name: str | None) -> tzinfo:
    if name is None or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest("tz must be an IANA time zone name such as Europe/Paris") from None


def _check_requester(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("requester must be a string")
    if len(value) > MAX_REQUESTER:
        raise BadRequest(f"requester must be at most {MAX_REQUESTER} characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest("requester must be text (a lone surrogate escape is not)") from None
    return value


def _answer(request: Request, requester: str, tz: str | None) -> Response:
    values = greeting(requester or "anonymous", datetime.now(_zone(tz)), tz or "UTC")
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(values)
    return PlainTextResponse(values["message"] + "\n")


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The greeting: text/plain, or JSON with Accept: application/json",
        "content": {"text/plain": {}, "application/json": {}},
    },
    400: {"description": "Unknown tz, requester too long, or a broken JSON body"},
}


@router.get("/datetime", summary="Greet the requester with the date and time", responses=_ANSWERS)
async def get_datetime(
    request: Request, requester: Requester = None, tz: TimeZone = None
) -> Response:
    return _answer(request, requester or "anonymous", tz)


@router.post(
    "/datetime",
    summary="Greet the requester named in a JSON body",
    responses=_ANSWERS,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"requester": {"type": "string", "maxLength": MAX_REQUESTER}},
                    }
                }
            },
        }
    },
)
async def post_datetime(
    request: Request, requester: Requester = None, tz: TimeZone = None
) -> Response:
    body = await read_body(request, MAX_BODY)
    if requester is None and body.strip():
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest('body must be a JSON object such as {"requester": "John"}') from None
        if not isinstance(document, dict):
            raise BadRequest('body must be a JSON object such as {"requester": "John"}')
        if "requester" in document and document["requester"] is not None:
            requester = _check_requester(document["requester"])
    return _answer(request, requester or "anonymous", tz)
