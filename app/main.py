"""The application factory. `uvicorn app.main:app` serves the service; tests call create_app().

Importing this module reads the settings and nothing else: no network, no files. The event
pipeline (store, notifier, token verifier) is opened on first use (see app/runtime.py) and
closed when the server stops, after in-flight requests have finished.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import datetime as datetime_api
from app.api import errors, events, health
from app.config import Settings, load_settings
from app.logs import current_trace, trace_from_header
from app.runtime import Runtime

if TYPE_CHECKING:
    from app.delivery.store import IdempotencyStore
    from app.notify.base import Notifier


class RequestContext:
    """Pure ASGI middleware: the Cloud Trace id for log lines, and `nosniff` on every answer."""

    def __init__(self, app: ASGIApp, project: str | None) -> None:
        self.app = app
        self.project = project

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"x-cloud-trace-context":
                header = value.decode("latin-1")
                break
        token = current_trace.set(trace_from_header(header, self.project))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current_trace.reset(token)


def create_app(
    settings: Settings | None = None,
    notifier: Notifier | None = None,
    store: IdempotencyStore | None = None,
) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, notifier=notifier, store=store)
        app.state.runtime = runtime
        gc.freeze()  # start-up's objects live as long as the process: keep GC passes short
        try:
            yield
        finally:
            await runtime.aclose()

    app = FastAPI(
        title="gcs-notifier",
        summary="Emails people when objects land in or leave a Cloud Storage bucket.",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks check the environment on every request; this service
        # logs for Cloud Logging instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    app.router.routes.append(events.route)
    app.include_router(datetime_api.router)
    app.include_router(health.router)
    app.add_middleware(RequestContext, project=settings.google_cloud_project)
    return app


app = create_app()
