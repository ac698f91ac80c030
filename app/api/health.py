"""GET|HEAD /healthz: 200 while the service can work, 503 once its open store cannot be reached."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.api.errors import problem
from app.delivery.store import StoreUnavailable
from app.runtime import Runtime

router = APIRouter()


@router.head("/healthz", include_in_schema=False)
@router.get(
    "/healthz",
    summary="Health check (HEAD too)",
    responses={
        200: {"description": "Serving"},
        503: {"description": "The idempotency store cannot be reached"},
    },
)
async def healthz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    try:
        await runtime.check_store()
    except StoreUnavailable as error:
        detail = f"idempotency store unavailable: {error}"
        return problem(503, detail, headers={"Retry-After": "10"})
    return JSONResponse({"status": "ok"})
