"""What the service runs on, opened on first use and closed at shutdown.

The event path (the CloudEvents SDK, the idempotency store, the `sendgrid` package, google-auth)
costs a noticeable share of start-up time and memory. None of it is needed to start
serving or to answer `/datetime`, so it loads when the first event arrives: an instance started
for `/datetime` starts as fast as a bare FastAPI app, and one started by an event pays the same
total either way.

A rules file (NOTIFY_RULES) belongs to the event path too. It is read, validated and compiled in
a worker thread at start-up, not on the first event, so a bad file stops the service at once
(`on_fatal`): as soon as anything needs the rules (an event, /healthz, which is Cloud Run's
start-up probe), or else 50 ms after the server starts, so that the first /datetime is not
slowed by the load. Events and /healthz wait for the load; a bad file answers both with 503.

When the rules have `digest` or `rate` routes, the event path is opened as soon as they load, and
a timer flushes due digest windows every DIGEST_FLUSH_SECONDS (1 s): a restarted service sends
the windows it left pending without waiting for an event. On Cloud Run with CPU only during
requests the timer cannot keep time (a flush frozen between requests would wake with its claims
expired), so Terraform and Cloud Build turn it off there and Cloud Scheduler calls
POST /digests/flush; a WARNING says so when it is on under K_SERVICE. At SIGTERM the timer stops:
a flush it has under way is awaited, never cut mid-send, and one last flush sends the windows
already due whose send fits in the grace period; the rest stay in the store.

Ready means able to deliver: /healthz (Cloud Run's start-up probe) opens the store on its first
call and checks it with a bounded call (READY_SECONDS), which also warms its connection.

With the outbox view on (app/outbox_view), the outbox notifier tells its feed of each file it
writes, and SIGTERM ends the view's live streams at once, so open pages do not hold up the
graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from app.config import Settings

if TYPE_CHECKING:
    from pathlib import Path

    from app.delivery.digests import Digests
    from app.delivery.pipeline import Pipeline
    from app.notify.base import Notifier
    from app.outbox_view.feed import OutboxFeed
    from app.rules.base import DigestRoute, Router
    from app.security.tokens import TokenVerifier
    from app.stores.claims import IdempotencyStore
    from app.stores.windows import DigestStore

log = logging.getLogger(__name__)

LOAD_SWITCH_INTERVAL = 0.0005  # seconds; sys.getswitchinterval() is 0.005 by default
RULES_LOAD_DELAY = 0.05  # seconds after start-up, unless something needs the rules sooner
READY_SECONDS = 5.0  # how long /healthz waits for the store to answer


def make_notifier(settings: Settings, outbox_feed: OutboxFeed | None = None) -> Notifier:
    if settings.notifier == "sendgrid":
        from app.notify.sendgrid import SendGridNotifier

        if settings.sendgrid_api_key is None:  # refused by Settings; never a silent fall-back
            raise ValueError("NOTIFIER=sendgrid requires SENDGRID_API_KEY")
        return SendGridNotifier(
            api_key=settings.sendgrid_api_key,
            host=settings.sendgrid_host,
            timeout=settings.sendgrid_timeout,
            sandbox=settings.sendgrid_sandbox,
        )
    from app.notify.outbox import OutboxNotifier

    on_written = outbox_feed.written if outbox_feed is not None else None
    return OutboxNotifier(settings.outbox_dir, on_written=on_written)


def make_verifier(settings: Settings) -> TokenVerifier:
    invokers = frozenset(settings.event_invokers)
    audiences = frozenset(settings.event_audience)
    if settings.event_auth == "iam":
        from app.security.iam import IamVerifier

        return IamVerifier(invokers=invokers, audiences=audiences)
    from app.security.oidc import OidcVerifier

    return OidcVerifier(certs_url=settings.oidc_certs_url, invokers=invokers, audiences=audiences)


def describe(settings: Settings, *, notifier: Notifier | None = None) -> dict[str, object]:
    """What the service runs with, for its first log line: no secrets, no store password."""
    fields: dict[str, object] = {
        "notifier": notifier.name if notifier is not None else settings.notifier,
        "store": _store_description(settings.idempotency_store),
        "event_auth": settings.event_auth,
        "recipients": len(settings.recipients),
        "rules": str(settings.notify_rules) if settings.notify_rules else None,
        "dead_letter_dir": str(settings.dead_letter_dir),
    }
    if notifier is None and settings.notifier == "sendgrid":
        fields["sendgrid_host"] = settings.sendgrid_host
        fields["sendgrid_sandbox"] = settings.sendgrid_sandbox
    elif notifier is None:
        fields["outbox_dir"] = str(settings.outbox_dir)
    return fields


def _store_description(url: str) -> str:
    if url.startswith(("redis://", "rediss://")):
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"  # without user and password
    return url


class Runtime:
    """Builds the pipeline and the token verifier once, on first use; tests may hand in a
    notifier or a store, which stay theirs to close. `on_loaded` runs once the event path has
    been imported (the process entry point freezes the collector there). `outbox_feed` hears of
    every file the outbox notifier it makes writes."""

    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        store: IdempotencyStore | None = None,
        digest_store: DigestStore | None = None,
        on_loaded: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        outbox_feed: OutboxFeed | None = None,
    ) -> None:
        self.settings = settings
        self._outbox_feed = outbox_feed
        self._notifier = notifier
        self._store = store
        self._digest_store = digest_store
        self._flush_timer: asyncio.Task[None] | None = None
        self._timer_flush: asyncio.Task[object] | None = None  # the timer's flush under way
        self._last_flush: asyncio.Task[object] | None = None
        self._stop_by: float | None = None  # SIGTERM's deadline, event loop time
        self._on_loaded = on_loaded
        self._on_fatal = on_fatal
        self._rules: asyncio.Task[Router] | None = None
        self._rules_soon: asyncio.TimerHandle | None = None
        self._pipeline: Pipeline | None = None
        self._verifier: TokenVerifier | None = None
        self._owned = AsyncExitStack()
        self._loop: asyncio.AbstractEventLoop | None = None

    def started(self) -> None:
        """Called in the lifespan's start-up, in the serving event loop."""
        self._loop = asyncio.get_running_loop()
        fields = describe(self.settings, notifier=self._notifier)
        path = self.settings.notify_rules
        if path is not None:
            del fields["recipients"]  # NOTIFY_TO plays no part: the routes name the recipients
            self._rules_soon = self._loop.call_later(RULES_LOAD_DELAY, self._load_rules_now)
        log.info("service started", extra=fields)

    def _load_rules_now(self) -> asyncio.Task[Router]:
        if self._rules is None:
            path = self.settings.notify_rules
            if self._loop is None or path is None:
                raise RuntimeError("rules load from NOTIFY_RULES once the server has started")
            if self._rules_soon is not None:
                self._rules_soon.cancel()
            self._rules = self._loop.create_task(self._load_rules(path))
        return self._rules

    async def _load_rules(self, path: Path) -> Router:
        from app.rules.errors import RulesUnavailable

        started = self._loop.time() if self._loop else 0.0
        # While the worker thread holds the GIL, the event loop's thread waits up to the switch
        # interval (5 ms) each time it wants it back, a few times per request: the first
        # /datetime answered during the load took about 15 ms longer. A shorter interval for
        # the load's duration lets the server through at once.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, LOAD_SWITCH_INTERVAL))
        try:
            router = await asyncio.to_thread(_load_router, path, self.settings.sender)
        except Exception as error:
            from app.rules.model import RulesError  # imported by the worker thread already

            if isinstance(error, RulesError):  # one line naming file, line, route and field
                message = f"NOTIFY_RULES: {error}"
                log.critical("the rules file cannot be used", extra={"error": message})
            else:  # a bug: the trace goes to the log
                message = (
                    f"NOTIFY_RULES: the rules file could not be loaded ({type(error).__name__})"
                )
                log.exception("the rules file could not be loaded")
            if self._on_fatal is not None:
                self._on_fatal(message)
            raise RulesUnavailable(message.removeprefix("NOTIFY_RULES: ")) from None
        finally:
            sys.setswitchinterval(interval)
        elapsed = (self._loop.time() - started) if self._loop else 0.0
        log.info(
            "routing rules loaded",
            extra={"rules": str(path), "routes": router.size, "seconds": round(elapsed, 3)},
        )
        if router.digest_routes() and self._pipeline is None:
            # Pending windows must go out after a restart without waiting for an event.
            try:
                self._pipeline = self._build_pipeline(router)
            except ValueError as error:  # a digest route with more recipients than a message
                message = f"NOTIFY_RULES: {error}"
                log.critical("the rules file cannot be used", extra={"error": message})
                if self._on_fatal is not None:
                    self._on_fatal(message)
                raise RulesUnavailable(str(error)) from None
        return router

    async def router(self) -> Router | None:
        """The rules' router once it is ready (RulesUnavailable if the file is bad); None without
        a rules file."""
        if self.settings.notify_rules is None:
            return None
        return await asyncio.shield(self._load_rules_now())

    async def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            router = await self.router()
            # Built synchronously, so concurrent first events cannot build two.
            if self._pipeline is None:
                self._pipeline = self._build_pipeline(router)
        return self._pipeline

    async def verifier(self) -> TokenVerifier | None:
        """The token verifier for EVENT_AUTH=oidc or iam, else None."""
        if self.settings.event_auth == "none":
            return None
        if self._verifier is None:
            self._verifier = make_verifier(self.settings)
            self._owned.push_async_callback(self._verifier.close)
        return self._verifier

    async def check_ready(self) -> None:
        """Wait for the rules file to load (RulesUnavailable if it is bad: a start-up probe that
        answered 503 while a good file was loading would come back only after its period, 10 s
        by default), then open the store if it is not open yet and check it can be reached
        within READY_SECONDS: StoreUnavailable otherwise. A revision whose store cannot be
        reached never passes its start-up probe, and the first event does not pay for the
        store's connection."""
        await self.router()
        from app.stores.base import StoreUnavailable

        store = self.store()
        try:
            async with asyncio.timeout(READY_SECONDS):
                await store.ping()
        except TimeoutError:
            raise StoreUnavailable(f"no answer within {READY_SECONDS:g} s") from None

    def store(self) -> IdempotencyStore:
        """The idempotency store, opened on first use (StoreUnavailable if it cannot be)."""
        if self._store is None:
            from app.stores.factory import open_store

            settings = self.settings
            self._store = open_store(
                settings.idempotency_store, retention_seconds=settings.dedupe_retention
            )
            self._owned.push_async_callback(self._store.aclose)
        return self._store

    def shutting_down(self, grace_seconds: float) -> None:
        """SIGTERM arrived: sends in flight must end within `grace_seconds`. Safe to call from
        a signal handler."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._drain, grace_seconds)

    def _drain(self, grace_seconds: float) -> None:
        if self._outbox_feed is not None:
            self._outbox_feed.close()  # open /outbox pages must not hold up the shutdown
        if self._pipeline is None or self._loop is None:
            return
        deadline = self._loop.time() + grace_seconds
        self._stop_by = deadline
        self._pipeline.drain(deadline)
        digests = self._pipeline.digests
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # between flushes, or waiting for one (shielded)
        if digests is not None and self._last_flush is None:
            digests.shutting_down(deadline)
            self._last_flush = self._loop.create_task(self._last_flush_of(digests))

    async def _last_flush_of(self, digests: Digests) -> object:
        """The timer's flush under way ends (never cut mid-send: it only stops claiming
        windows), then the windows already due go out if their sends fit before SIGKILL; the
        rest stay pending."""
        if self._timer_flush is not None and not self._timer_flush.done():
            await asyncio.wait({self._timer_flush})
        return await digests.flush(count_pending=False)

    async def digests(self) -> Digests | None:
        """The digest routes' windows and flush, or None when no route has a digest or rate."""
        return (await self.pipeline()).digests

    async def _flush_every_tick(self, digests: Digests, seconds: float) -> None:
        from app.stores.base import StoreUnavailable

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            # Shielded: cancelling the timer at SIGTERM must not cut a send under way.
            self._timer_flush = loop.create_task(digests.flush(count_pending=False))
            try:
                await asyncio.shield(self._timer_flush)
            except StoreUnavailable as error:
                log.warning(
                    "digest flush failed; the next one tries again", extra={"reason": str(error)}
                )
            except Exception:
                log.exception("digest flush failed; the next one tries again")

    def _build_pipeline(self, router: Router | None) -> Pipeline:
        from app.delivery.deadletter import DeadLetterBox
        from app.delivery.pipeline import Pipeline
        from app.rules.default import DefaultRouter

        settings = self.settings
        store = self.store()
        notifier = self._notifier
        if notifier is None:
            notifier = make_notifier(settings, self._outbox_feed)
            self._owned.push_async_callback(notifier.aclose)
        routes = router.digest_routes() if router is not None else {}
        digests = self._build_digests(routes, notifier, store) if routes else None
        log.info("event pipeline ready", extra={"notifier": notifier.name})
        pipeline = Pipeline(
            store=store,
            notifier=notifier,
            router=router or DefaultRouter(settings.recipients, settings.sender),
            dead_letters=DeadLetterBox(settings.dead_letter_dir),
            lease_seconds=settings.claim_lease_seconds,
            send_seconds=notifier.send_seconds,
            retention_seconds=settings.dedupe_retention,
            digests=digests,
        )
        tick = settings.digest_flush_seconds
        if digests is not None and self._loop is not None and tick > 0:
            if settings.k_service:
                log.warning(
                    "the digest flush timer is on under Cloud Run (K_SERVICE): with CPU only"
                    " during requests a flush frozen between requests wakes with its claims"
                    " lost; set DIGEST_FLUSH_SECONDS=0 and let Cloud Scheduler call POST"
                    " /digests/flush (eventarc.tf and cloudbuild.yaml do)",
                    extra={"digest_flush_seconds": tick, "digest_routes": sorted(routes)},
                )
            self._flush_timer = self._loop.create_task(self._flush_every_tick(digests, tick))
        if self._on_loaded is not None:
            self._on_loaded()
        return pipeline

    def _build_digests(
        self, routes: Mapping[str, DigestRoute], notifier: Notifier, claims: IdempotencyStore
    ) -> Digests:
        from app.delivery.digests import DigestDeadLetterFolder, Digests
        from app.stores.factory import open_digest_store

        settings = self.settings
        store = self._digest_store
        if store is None:
            url = settings.idempotency_store
            if settings.k_service and url.startswith("sqlite:"):
                log.warning(
                    "digest windows are kept in SQLite on Cloud Run: the file lives in the "
                    "instance's memory, so pending digests are lost when the instance stops; "
                    "set IDEMPOTENCY_STORE to a firestore:// (or redis://) URL",
                    extra={"store": url, "digest_routes": sorted(routes)},
                )
            store = open_digest_store(
                url, retention_seconds=settings.dedupe_retention, claims=claims
            )
            self._owned.push_async_callback(store.aclose)
        return Digests(
            store=store,
            notifier=notifier,
            routes=routes,
            sender=settings.sender,
            dead_letters=DigestDeadLetterFolder(settings.dead_letter_dir),
            lease_seconds=settings.claim_lease_seconds,
            send_seconds=notifier.send_seconds,
            budget_seconds=settings.digest_flush_budget_seconds,
        )

    async def aclose(self) -> None:
        if self._outbox_feed is not None:
            self._outbox_feed.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_timer
        if self._last_flush is not None:
            try:
                await self._last_flush
            except asyncio.CancelledError:
                log.warning("the last digest flush was cut short; pending windows stay stored")
            except Exception as error:
                log.warning(
                    "the last digest flush failed; pending windows stay stored",
                    extra={"reason": str(error) or type(error).__name__},
                )
        if self._pipeline is not None:
            # Done marks still being retried get what is left of the grace period.
            left = 0.0 if self._stop_by is None or self._loop is None else self._stop_by
            left = max(left - (self._loop.time() if self._loop else 0.0), 0.0)
            await self._pipeline.aclose(left)
            if self._pipeline.digests is not None:
                await self._pipeline.digests.aclose(left)
        if self._rules_soon is not None:
            self._rules_soon.cancel()
        if self._rules is not None:
            if not self._rules.done():
                self._rules.cancel()
            elif not self._rules.cancelled():
                self._rules.exception()  # retrieved: a bad file was reported when it was read
        await self._owned.aclose()


def _load_router(path: Path, sender: str) -> Router:
    """In a worker thread: even the import of the rules code (YAML) stays off the event loop."""
    from app.rules.routing import load_router

    return load_router(path, sender)
