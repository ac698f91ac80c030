"""The one place that turns exceptions into HTTP answers: RFC 9457 problem+json.

No answer ever echoes request headers or a traceback. Statuses are chosen for Eventarc, which
redelivers anything but 102/200/201/202/204: 4xx for requests that will never work as sent,
409/503 for "not now, deliver again".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from app.delivery.errors import InFlight
from app.events.errors import EventDecodeError
from app.notify.errors import TransientDeliveryError
from app.rules.errors import RulesUnavailable
from app.security.errors import CertificatesUnavailable, EventAuthError, Forbidden
from app.stores.base import StoreUnavailable

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
# Set in the ASGI scope once a failure has been logged, so the outer layer does not log it again.
LOGGED_KEY = "gcs_notifier.error_logged"
DEFAULT_RETRY_AFTER = 10  # seconds; Eventarc's backoff starts at 10 s too


class RequestTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit // 1024} KiB")


class RequestTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s")


class BadRequest(ValueError):
    """A request that can never succeed as sent; the message says what to fix."""


def problem(
    status: int,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _retry(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds or DEFAULT_RETRY_AFTER)))}


async def _decode_error(_: Request, error: EventDecodeError) -> JSONResponse:
    log.info("event rejected", extra={"reason": error.detail, "problems": error.problems})
    return problem(400, error.detail, errors=error.problems)


async def _bad_request(_: Request, error: Exception) -> JSONResponse:
    return problem(400, str(error))


async def _too_large(_: Request, error: Exception) -> JSONResponse:
    return problem(413, str(error))


async def _timeout(_: Request, error: Exception) -> JSONResponse:
    return problem(408, str(error), headers={"Connection": "close"})


async def _in_flight(_: Request, error: Exception) -> JSONResponse:
    return problem(409, str(error), headers=_retry(None))


async def _transient(_: Request, error: TransientDeliveryError) -> JSONResponse:
    return problem(503, error.reason, headers=_retry(error.retry_after))


async def _store_unavailable(_: Request, error: Exception) -> JSONResponse:
    log.error("idempotency store unavailable", extra={"reason": str(error)})
    return problem(503, "delivery state is unavailable, try again later", headers=_retry(None))


async def _rules_unavailable(_: Request, error: Exception) -> JSONResponse:
    return problem(503, f"routing rules not ready: {error}", headers=_retry(None))


async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
    errors = [
        {"field": ".".join(str(part) for part in item["loc"]), "message": item["msg"]}
        for item in error.errors()
    ]
    return problem(400, "invalid request parameters", errors=errors)


async def _http(_: Request, error: HTTPException) -> JSONResponse:
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    return problem(error.status_code, detail, headers=error.headers)


async def _refused(_: Request, error: EventAuthError) -> JSONResponse:
    if isinstance(error, CertificatesUnavailable):
        # Not the caller's fault: Eventarc retries, nothing is lost.
        log.error("cannot verify event tokens", extra={"reason": str(error)})
        return problem(503, str(error), headers=_retry(None))
    status = 403 if isinstance(error, Forbidden) else 401
    log.warning("event delivery refused", extra={"status": status, "reason": str(error)})
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
    return problem(status, str(error), headers=headers)


async def _disconnected(request: Request, _: Exception) -> JSONResponse:
    # The client hung up before its body arrived: nobody is left to answer, and Eventarc
    # redelivers what it did not see acknowledged.
    log.info("client disconnected before sending its body", extra={"path": request.url.path})
    return problem(400, "client disconnected")


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # A bug, not the client's fault. The trace goes to the log; the client learns nothing more.
    log.exception("unhandled error", extra={"path": request.url.path})
    request.scope[LOGGED_KEY] = True
    return problem(500, "internal error")


async def answer(error: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `error` with the handler install() registered for its class (the nearest in its
    MRO), as Starlette's exception middleware would: for routes served without it."""
    request = Request(scope, receive)
    handlers = request.app.exception_handlers
    for cls in type(error).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            response = await handler(request, error)
            await response(scope, receive, send)
            return
    raise error  # pragma: no cover - install() registers a handler for Exception


def install(app: FastAPI) -> None:
    handlers: list[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]]] = [
        (EventDecodeError, _decode_error),
        (BadRequest, _bad_request),
        (RequestTooLarge, _too_large),
        (RequestTimeout, _timeout),
        (InFlight, _in_flight),
        (TransientDeliveryError, _transient),
        (StoreUnavailable, _store_unavailable),
        (RulesUnavailable, _rules_unavailable),
        (EventAuthError, _refused),
        (ClientDisconnect, _disconnected),
        (RequestValidationError, _validation),
        (HTTPException, _http),
        (Exception, _unexpected),
    ]
    for exception, handler in handlers:
        app.exception_handler(exception)(handler)
