"""What the service runs on, opened on first use and closed at shutdown.

The event path (the CloudEvents SDK, the idempotency store, the `sendgrid` package, google-auth)
costs a noticeable share of start-up time and memory. None of it is needed to start
serving or to answer `/datetime`, so it loads when the first event arrives: an instance started
for `/datetime` starts as fast as a bare FastAPI app, and one started by an event pays the same
total either way.
"""

from __future__ import annotations

import gc
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:
    from app.delivery.pipeline import Pipeline
    from app.delivery.store import IdempotencyStore
    from app.notify.base import Notifier
    from app.security.oidc import OidcVerifier

log = logging.getLogger(__name__)


def make_notifier(settings: Settings) -> Notifier:
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


def make_verifier(settings: Settings) -> OidcVerifier:
    from app.security.oidc import OidcVerifier

    return OidcVerifier(
        certs_url=settings.oidc_certs_url,
        invokers=frozenset(settings.event_invokers),
        audiences=frozenset(settings.event_audience),
    )


class Runtime:
    """Builds the pipeline and the token verifier once, on first use; tests may hand in a
    notifier or a store, which stay theirs to close."""

    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        store: IdempotencyStore | None = None,
    ) -> None:
        self.settings = settings
        self._notifier = notifier
        self._store = store
        self._pipeline: Pipeline | None = None
        self._verifier: OidcVerifier | None = None
        self._owned = AsyncExitStack()

    async def pipeline(self) -> Pipeline:
        # Built synchronously, so concurrent first events cannot build two.
        if self._pipeline is None:
            self._pipeline = self._build_pipeline()
        return self._pipeline

    async def verifier(self) -> OidcVerifier | None:
        """The token verifier when EVENT_AUTH=oidc, else None."""
        if self.settings.event_auth != "oidc":
            return None
        if self._verifier is None:
            self._verifier = make_verifier(self.settings)
            self._owned.push_async_callback(self._verifier.close)
        return self._verifier

    def _build_pipeline(self) -> Pipeline:
        from app.delivery.deadletter import DeadLetterBox
        from app.delivery.pipeline import Audience, Pipeline
        from app.delivery.store import open_store

        settings = self.settings
        store = self._store
        if store is None:
            store = open_store(settings.idempotency_store)
            self._owned.push_async_callback(store.aclose)
        notifier = self._notifier
        if notifier is None:
            notifier = make_notifier(settings)
            self._owned.push_async_callback(notifier.aclose)
        log.info(
            "event pipeline ready",
            extra={
                "notifier": notifier.name,
                "store": settings.idempotency_store.split(":", 1)[0],
                "recipients": len(settings.recipients),
            },
        )
        pipeline = Pipeline(
            store=store,
            notifier=notifier,
            audience=Audience(recipients=settings.recipients, sender=settings.sender),
            dead_letters=DeadLetterBox(settings.dead_letter_dir),
            lease_seconds=settings.claim_lease_seconds,
        )
        # The imports above leave a few hundred thousand long-lived objects; move them out of
        # the cyclic collector's reach so its full passes stay short under load (the p99).
        gc.freeze()
        return pipeline

    async def aclose(self) -> None:
        await self._owned.aclose()
