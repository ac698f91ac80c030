"""The application factory. `uvicorn app.main:app` serves the service; tests call create_app().

Importing this module reads the settings and nothing else: no network, no files. The store, the
notifier and the token verifier are opened when the server starts (lifespan) and closed when it
stops, after in-flight requests have finished.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import datetime as datetime_api
from app.api import errors, events, health
from app.config import Settings, load_settings
from app.delivery.deadletter import DeadLetterBox
from app.delivery.pipeline import Audience, Pipeline
from app.delivery.store import IdempotencyStore, open_store
from app.logs import current_trace, trace_from_header
from app.notify.base import Notifier

log = logging.getLogger(__name__)


def make_notifier(settings: Settings) -> Notifier:
    """The configured notifier; SendGrid's client is imported only when it is the one used."""
    if settings.notifier == "sendgrid" and settings.sendgrid_api_key is not None:
        from app.notify.sendgrid import SendGridNotifier

        return SendGridNotifier(
            api_key=settings.sendgrid_api_key,
            host=settings.sendgrid_host,
            timeout=settings.sendgrid_timeout,
            sandbox=settings.sendgrid_sandbox,
        )
    from app.notify.outbox import OutboxNotifier

    return OutboxNotifier(settings.outbox_dir)


def make_verifier(settings: Settings) -> Any:
    from app.security.oidc import OidcVerifier

    return OidcVerifier(
        certs_url=settings.oidc_certs_url,
        invokers=frozenset(settings.event_invokers),
        audiences=frozenset(settings.event_audience),
    )


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
        async with AsyncExitStack() as owned:
            active_store = store or open_store(settings.idempotency_store)
            if store is None:
                owned.push_async_callback(active_store.aclose)
            active_notifier = notifier or make_notifier(settings)
            if notifier is None:
                owned.push_async_callback(active_notifier.aclose)
            verifier = make_verifier(settings) if settings.event_auth == "oidc" else None
            if verifier is not None:
                owned.push_async_callback(verifier.close)
            app.state.settings = settings
            app.state.verifier = verifier
            app.state.pipeline = Pipeline(
                store=active_store,
                notifier=active_notifier,
                audience=Audience(recipients=settings.recipients, sender=settings.sender),
                dead_letters=DeadLetterBox(settings.dead_letter_dir),
                lease_seconds=settings.claim_lease_seconds,
            )
            log.info(
                "service ready",
                extra={
                    "notifier": active_notifier.name,
                    "store": settings.idempotency_store.split(":", 1)[0],
                    "event_auth": settings.event_auth,
                    "recipients": len(settings.recipients),
                },
            )
            yield

    app = FastAPI(
        title="gcs-notifier",
        summary="Emails people when objects land in or leave a Cloud Storage bucket.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    if settings.event_auth == "oidc":
        install_auth_errors(app)
    app.include_router(events.router)
    app.include_router(datetime_api.router)
    app.include_router(health.router)
    app.add_middleware(RequestContext, project=settings.google_cloud_project)
    return app


def install_auth_errors(app: FastAPI) -> None:
    """401/403 for callers without a valid token of an invoker; 503 when Google's certificates
    cannot be fetched (not the caller's fault: Eventarc retries)."""
    from app.security.oidc import CertificatesUnavailable, EventAuthError, Forbidden

    async def refused(_: Any, error: EventAuthError) -> Any:
        if isinstance(error, CertificatesUnavailable):
            log.error("cannot verify event tokens", extra={"reason": str(error)})
            return errors.problem(503, str(error), headers={"Retry-After": "10"})
        status = 403 if isinstance(error, Forbidden) else 401
        log.warning("event delivery refused", extra={"status": status, "reason": str(error)})
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
        return errors.problem(status, str(error), headers=headers)

    app.exception_handler(EventAuthError)(refused)


app = create_app()
