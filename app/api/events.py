"""POST / : where Eventarc delivers Cloud Storage events (`/?__GCP_CloudEventsMode=...` too).

A plain Starlette endpoint, not a FastAPI one: the body is raw bytes for the CloudEvents SDK, so
FastAPI's parameter solving would only cost time on the one path that carries the load (which
app.main.RequestContext also sends past the framework's middleware).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response

from app.api.body import read_body
from app.runtime import Runtime


async def authorize(request: Request, runtime: Runtime) -> None:
    """EVENT_AUTH's check, for events and for every route that acts on them (/digests)."""
    verifier = await runtime.verifier()
    if verifier is not None:
        # Cloud Run IAM checks X-Serverless-Authorization instead of Authorization when both
        # come; the verifier needs both to tell which token was checked.
        await verifier.verify(
            request.headers.get("authorization"),
            str(request.url),
            serverless_authorization=request.headers.get("x-serverless-authorization"),
        )


async def receive_event(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    # Before the body is read: strangers cost us a header check, nothing more.
    await authorize(request, runtime)
    body = await read_body(request)
    pipeline = await runtime.pipeline()
    result = await pipeline.receive(request.headers, body)
    answer: dict[str, object] = {"status": result.outcome.value, "id": result.event_id}
    if result.unconfirmed:
        answer["unconfirmed"] = result.unconfirmed
    return JSONResponse(answer)


route = Route("/", receive_event, methods=["POST"], name="receive_event")
# What app.main.RequestContext calls for POST / directly; the route above serves the documents and
# the 405 of other methods.
asgi = request_response(receive_event)
