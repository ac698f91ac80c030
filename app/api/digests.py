"""`POST /digests/flush` and `GET /digests`: the digest windows, for a clock outside the process.

On Cloud Run, CPU is throttled between requests, so the in-process timer cannot keep time there:
Cloud Scheduler calls `POST /digests/flush` every minute (eventarc.tf, `digest_schedule`), which
sends the due windows within the flush's time budget (DIGEST_FLUSH_BUDGET_SECONDS) and says how
many it left for the next call. `GET /digests` counts each window's events without reading them.
Both routes are protected exactly as event delivery is (EVENT_AUTH): a flush sends email, and
the list names routes and object counts.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.api.events import authorize
from app.runtime import Runtime

FLUSH_LIMIT = 1000  # windows per call; the rest are still due at the next call


async def flush_digests(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    await authorize(request, runtime)
    digests = await runtime.digests()
    if digests is None:
        return JSONResponse(
            {"flushed": 0, "pending": 0, "failed": 0, "dead_lettered": 0, "left": 0}
        )
    result = await digests.flush(limit=FLUSH_LIMIT)
    return JSONResponse(
        {
            "flushed": result.flushed,
            "pending": result.pending,
            "failed": result.failed,
            "dead_lettered": result.dead_lettered,
            "left": result.left,  # due windows the flush's time budget left for the next one
        }
    )


async def list_digests(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    await authorize(request, runtime)
    digests = await runtime.digests()
    windows = [] if digests is None else await digests.store.pending(digests.clock())
    return JSONResponse(
        {
            "windows": [
                {
                    "id": window.window_id,
                    "route": window.route,
                    "opened": _iso(window.opened_at),
                    "due": _iso(window.due_at),
                    "events": window.events,
                    "state": window.state.value,
                }
                for window in windows
            ]
        }
    )


def _iso(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


routes = [
    Route("/digests/flush", flush_digests, methods=["POST"], name="flush_digests"),
    Route("/digests", list_digests, methods=["GET"], name="list_digests"),
]
