"""Digest routes join events to windows, and a flush sends each due window as one email.

The pipeline calls `Digests.join` for an event a `digest` route matched, and `Digests.take` then
`Digests.overflow` for one a `rate` route matched; the flush timer (app.runtime),
`POST /digests/flush` and SIGTERM call `Digests.flush`.

A route's recipients and window settings are given once, at construction (`DigestRoute`), not
with each event: a flush after a restart must know whom to tell about a window without waiting
for a new event.

For each due window a flush: claims it with a lease (another flush holding it, or one that
already sent it, means skip) -> reads its summary -> renders one email -> sends it -> marks the
window done. A send that fails for now (SendGrid down, 429, a full disk) releases the window,
which stays pending and goes out on the next flush; a digest SendGrid rejects for good is
written to the dead-letter folder and marked done. So two flushes at once send a window once,
and a failed send followed by a later one sends it once.

One email per window: a digest route's recipients must fit in one message of the notifier
(`max_recipients`), checked at construction. Split into batches, a partial failure would resend
the batches already accepted, since the window is claimed as a whole.

`lease_seconds` must exceed the notifier's timeout: a send that outlives its lease may be sent
again by another flush.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.digests.render import render_digest
from app.digests.window import DigestItem
from app.events.models import StorageEvent
from app.files import write_json
from app.notify.base import (
    Notification,
    Notifier,
    RejectedDeliveryError,
    TransientDeliveryError,
)
from app.rules.base import DigestRoute
from app.rules.templates import with_footer
from app.stores.base import Claim
from app.stores.windows import Added, DigestStore, DigestWindow, Taken

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlushResult:
    flushed: int  # windows sent and marked done
    pending: int  # windows not yet sent, after this flush
    failed: int  # windows whose send failed for now: still pending, sent by a later flush
    dead_lettered: int = 0  # windows rejected for good: in the dead-letter folder, done


class DigestDeadLetters(Protocol):
    def put(self, window_id: str, summary_json: dict[str, object], reason: str) -> object:
        """Keep the digest; raises OSError when it could not (the window is then retried)."""
        ...


class DigestDeadLetterFolder:
    """One JSON file per digest, written atomically beside the single events' files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, window_id: str, summary_json: dict[str, object], reason: str) -> Path:
        now = datetime.now(UTC)
        document: dict[str, Any] = {
            "kind": "digest",
            "window_id": window_id,
            "reason": reason,
            "dead_lettered_at": now.isoformat().replace("+00:00", "Z"),
            "summary": summary_json,
        }
        # The window id holds the route's name, which need not be a valid file name.
        digest = hashlib.sha256(window_id.encode()).hexdigest()[:16]
        final = self.directory / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-digest-{digest}.json"
        write_json(final, document)
        # Also in the log, whole: on Cloud Run the folder lives in the instance's memory.
        log.error(
            "digest dead-lettered",
            extra={"digest_window": window_id, "path": str(final), "dead_letter": document},
        )
        return final


def digest_footer(route: str, count: int) -> str:
    """'Sent by route finance-reports as a digest of 5,000 changes'"""
    changes = "1 change" if count == 1 else f"{count:,} changes"
    return f"Sent by route {route} as a digest of {changes}"


class Digests:
    def __init__(
        self,
        *,
        store: DigestStore,
        notifier: Notifier,
        routes: Mapping[str, DigestRoute],
        sender: str,
        dead_letters: DigestDeadLetters | None,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        limit = notifier.max_recipients
        for name, route in routes.items():
            if name != route.name:
                raise ValueError(f"digest route {route.name!r} is filed under {name!r}")
            if not route.recipients:
                raise ValueError(f"digest route {name!r} has no recipients")
            if limit is not None and len(route.recipients) > limit:
                raise ValueError(
                    f"digest route {name!r} has {len(route.recipients)} recipients; a digest is "
                    f"one message, and {notifier.name} takes at most {limit}"
                )
        self.store = store
        self.notifier = notifier
        self.routes = dict(routes)
        self.sender = sender
        self.dead_letters = dead_letters
        self.lease_seconds = lease_seconds
        self.clock = clock

    async def join(self, route: str, event: StorageEvent) -> Added:
        """A `digest` route's event joins its window (or, with `leading`, opens an empty one and
        is to go out alone: `Added.leading`). Durable before it returns (StoreUnavailable
        otherwise); KeyError for a route that is not a digest route."""
        spec = self.routes[route]
        leading_after = spec.window_seconds if spec.leading else None
        return await self.store.add(
            spec.name,
            spec.window_seconds,
            spec.max_items,
            DigestItem.of(event),
            self.clock(),
            leading_after=leading_after,
        )

    async def take(self, route: str) -> Taken:
        """A `rate` route's event: may it go out now? Counts it against the period if so."""
        spec = self.routes[route]
        if spec.rate is None:
            raise KeyError(f"route {route!r} has no rate")
        return await self.store.take(spec.name, spec.rate.max, spec.rate.per_seconds, self.clock())

    async def overflow(self, route: str, event: StorageEvent, period_end: float) -> Added:
        """A `rate` route's event past the limit joins the digest sent when the period ends."""
        spec = self.routes[route]
        now = self.clock()
        return await self.store.add(
            spec.name, max(period_end - now, 0.0), spec.max_items, DigestItem.of(event), now
        )

    async def flush(
        self, now: float | None = None, limit: int = 100, *, count_pending: bool = True
    ) -> FlushResult:
        """Send up to `limit` due windows, earliest first. `pending` is -1 without
        `count_pending` (the timer's flushes, every second, need not count)."""
        now = self.clock() if now is None else now
        owner = uuid.uuid4().hex
        flushed = failed = dead_lettered = 0
        for window_id in await self.store.due(now, limit):
            state = await self.store.claim(window_id, owner, self.lease_seconds, now)
            if state is not Claim.CLAIMED:
                continue  # another flush is sending it, or it was sent
            outcome = await self._send(window_id, owner, now)
            flushed += outcome == "sent"
            failed += outcome == "failed"
            dead_lettered += outcome == "dead-lettered"
        pending = len(await self.store.pending(now)) if count_pending else -1
        return FlushResult(flushed, pending, failed, dead_lettered)

    async def _send(self, window_id: str, owner: str, now: float) -> str:
        """One claimed window: "sent", "empty" (done, nothing to tell), "failed" (released) or
        "dead-lettered" (done)."""
        try:
            window = await self.store.read(window_id)
            route = self.routes.get(window.info.route)
            if window.summary.count == 0:
                # Opened by a leading event, which went out alone, and nothing followed.
                await self.store.complete(window_id, owner, now)
                return "empty"
            if route is None:
                reason = f"route {window.info.route!r} is not a digest route any more"
                log.error("digest of an unknown route", extra=_fields(window, reason=reason))
                rejected: RejectedDeliveryError | None = RejectedDeliveryError(reason)
            else:
                try:
                    receipt = await self.notifier.send(self._notification(window, route))
                    rejected = None
                except RejectedDeliveryError as error:
                    rejected = error
            if rejected is not None:
                if self.dead_letters is None:
                    raise TransientDeliveryError(
                        f"digest rejected ({rejected.reason}) and no dead-letter folder to keep it"
                    )
                try:
                    self.dead_letters.put(window_id, window.summary.to_json(), rejected.reason)
                except OSError as error:
                    raise TransientDeliveryError(
                        f"could not write the dead-letter file: {error.strerror}"
                    ) from error
        except TransientDeliveryError as error:
            await self.store.release(window_id, owner, now)
            log.warning(
                "digest not sent; it stays pending for the next flush",
                extra={"digest_window": window_id, "reason": error.reason},
            )
            return "failed"
        except BaseException:
            # A store failure, cancellation or a bug: the next flush may send it now.
            await self.store.release(window_id, owner, now)
            raise
        # Sent or kept: a store failure from here on leaves the claim to its lease, never
        # released, so the window is not sent again at once.
        await self.store.complete(window_id, owner, now)
        if rejected is not None:
            return "dead-lettered"
        log.info(
            "digest sent",
            extra={
                **_fields(window),
                "notifier": receipt.notifier,
                "message_id": receipt.message_id,
                "sandbox": receipt.sandbox,
                "recipients": len(route.recipients) if route else 0,
            },
        )
        return "sent"

    def _notification(self, window: DigestWindow, route: DigestRoute) -> Notification:
        summary = window.summary
        rendered = render_digest(summary, route.name)
        if route.templates is not None:
            rendered = route.templates.render(summary, route.name, rendered)
        rendered = with_footer(rendered, digest_footer(route.name, summary.count))
        return Notification(
            key=f"digest:{window.info.window_id}",
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            recipients=route.recipients,
            sender=self.sender,
            context={k: str(v) for k, v in _fields(window).items()},
        )


def _fields(window: DigestWindow, **more: object) -> dict[str, object]:
    return {
        "digest_window": window.info.window_id,
        "route": window.info.route,
        "events": window.info.events,
        **more,
    }
