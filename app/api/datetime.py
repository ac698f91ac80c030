"""GET|HEAD|POST /datetime: the book's HTTP function, a greeting with today's date and the time.

The answer is text/plain or JSON, chosen from the request's Accept header as RFC 9110 §12.5.1
says. Werkzeug (which the `sendgrid` package already brings) parses the header: media ranges,
parameters, quoted strings, q-values; matching follows the RFC, in any letter case:
- each answer gets the q-value of the most specific range that matches it (`text/plain` over
  `text/*` over `*/*`); a range with parameters matches only an answer that has them (both
  answers are UTF-8: `charset=utf-8` matches either);
- the higher q-value wins; on a tie, text/plain (the book's answer);
- no Accept header, or nothing in it that reads as a media range: text/plain;
- an Accept that rules out both (`application/json;q=0`, `image/png`): 406 with a problem
  document naming the two types. A client that said it cannot read either is told so, rather
  than handed a body it did not ask for.
HEAD answers like GET without a body (uptime monitors use it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from app.api.body import read_body
from app.api.errors import BadRequest

TEXT = "text/plain"
JSON = "application/json"
ANSWER_PARAMETERS = frozenset({"charset=utf-8"})  # what a range's parameters may ask of either
VARY = {"Vary": "Accept"}


class DatetimeRoute(APIRoute):
    """Answers a method no /datetime route takes with every method they do take. Starlette's
    router hands such a request to the first route whose path matched, which would list only
    its own methods (`allow: GET` for a PUT, though POST works)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in (self.methods or ()):
            raise HTTPException(405, headers={"Allow": ALLOW})
        await super().handle(scope, receive, send)


router = APIRouter(route_class=DatetimeRoute)

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


# What most clients send (curl, monitors, scripts), answered without parsing: importing Werkzeug
# costs about 30 ms, which a cold start would otherwise pay on its first request.
_COMMON_ACCEPT = {"": TEXT, "*/*": TEXT, "text/plain": TEXT, "application/json": JSON}


def negotiate(accept: str | None) -> str:
    """TEXT or JSON for this Accept header, or HTTPException 406 (see the module's docstring)."""
    common = _COMMON_ACCEPT.get(accept.strip() if accept is not None else "")
    if common is not None:
        return common
    from werkzeug.datastructures import MIMEAccept
    from werkzeug.http import parse_accept_header

    ranges = [
        media_range
        for value, quality in parse_accept_header(accept, MIMEAccept)
        if (media_range := _media_range(value, quality)) is not None
    ]
    if not ranges:
        return TEXT  # RFC 9110 §12.5.1: a server may disregard what it cannot use
    best = max((TEXT, JSON), key=lambda answer: _quality(ranges, answer))  # a tie: TEXT
    if _quality(ranges, best) <= 0:
        raise HTTPException(
            406, detail=f"this resource is available as {TEXT} or {JSON}", headers=VARY
        )
    return best


MediaRange = tuple[str, str, frozenset[str], float]  # type, subtype, parameters, q-value


def _media_range(value: str, quality: float) -> MediaRange | None:
    media, *parameters = (part.strip().lower() for part in value.split(";"))
    kind, slash, subtype = media.partition("/")
    if not slash or not kind or not subtype or (kind == "*" and subtype != "*"):
        return None
    return kind, subtype, frozenset(parameters), quality


def _quality(ranges: list[MediaRange], answer: str) -> float:
    """The q-value of the most specific range that matches `answer`; 0 when none does."""
    kind, subtype = answer.split("/")
    best_specificity, best_quality = -1, 0.0
    for range_kind, range_subtype, parameters, quality in ranges:
        if range_kind == "*":
            specificity = 0
        elif range_kind != kind:
            continue
        elif range_subtype == "*":
            specificity = 1
        elif range_subtype == subtype and parameters <= ANSWER_PARAMETERS:
            specificity = 2 + len(parameters)
        else:
            continue
        if (specificity, quality) > (best_specificity, best_quality):
            best_specificity, best_quality = specificity, quality
    return best_quality


def _answer(request: Request, requester: str, tz: str | None) -> Response:
    values = greeting(requester or "anonymous", datetime.now(_zone(tz)), tz or "UTC")
    if negotiate(request.headers.get("accept")) == JSON:
        return JSONResponse(values, headers=VARY)
    return PlainTextResponse(values["message"] + "\n", headers=VARY)


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The greeting: text/plain, or JSON when Accept prefers application/json",
        "content": {"text/plain": {}, "application/json": {}},
    },
    400: {"description": "Unknown tz, requester too long, or a broken JSON body"},
    406: {
        "description": "Accept rules out both text/plain and application/json",
        "content": {"application/problem+json": {}},
    },
}


@router.get("/datetime", summary="Greet the requester with the date and time", responses=_ANSWERS)
async def get_datetime(
    request: Request, requester: Requester = None, tz: TimeZone = None
) -> Response:
    return _answer(request, requester or "anonymous", tz)


# HEAD is GET without the body (uvicorn sends the headers only). Left out of the OpenAPI
# document: it would repeat GET's operation under the same id.
router.add_api_route("/datetime", get_datetime, methods=["HEAD"], include_in_schema=False)


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


def _methods(routes: Sequence[BaseRoute]) -> str:
    taken = {
        method for route in routes if isinstance(route, APIRoute) for method in route.methods or ()
    }
    return ", ".join(sorted(taken))


ALLOW = _methods(router.routes)  # "GET, HEAD, POST"
