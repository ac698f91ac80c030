"""GET|HEAD /healthz: 200 while the service can deliver. It waits for the rules file to load (it
is Cloud Run's start-up probe: an early 503 would hold the instance back a whole probe period),
and answers 503 when that file is bad or the store cannot be reached within 5 s (opened on the
first call, so a revision with a broken store never passes its start-up probe). The answer names
no host, address or library error: those go to the log."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.api.errors import problem
from app.rules.errors import RulesUnavailable
from app.runtime import Runtime
from app.stores.base import StoreUnavailable

log = logging.getLogger(__name__)
router = APIRouter()


@router.head("/healthz", include_in_schema=False)
@router.get(
    "/healthz",
    summary="Health check (HEAD too)",
    responses={
        200: {"description": "Serving"},
        503: {"description": "The rules file is bad, or the store cannot be reached"},
    },
)
async def healthz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    try:
        await runtime.check_ready()
    except StoreUnavailable as error:
        log.warning("health check: the store cannot be reached", extra={"reason": str(error)})
        detail = "the delivery state store cannot be reached"
        return problem(503, detail, headers={"Retry-After": "10"})
    except RulesUnavailable as error:
        return problem(503, f"routing rules not ready: {error}", headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok"})
