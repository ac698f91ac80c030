"""Digest routes join events to windows, and a flush sends each due window as one email.

The pipeline calls `Digests.join` for an event a `digest` route matched, and `Digests.take` then
`Digests.overflow` for one a `rate` route matched; `POST /digests/flush` (Cloud Scheduler), the
flush timer where the CPU is always there (app.runtime) and SIGTERM call `Digests.flush`.

A route's recipients and window settings are given once, at construction (`DigestRoute`), not
with each event: a flush after a restart must know whom to tell about a window without waiting
for a new event.

For each due window a flush: claims it (a fenced lease from the clock at that moment; another
flush holding it, or one that already sent it, means skip) -> reads its summary -> renders one
email -> renews the claim, so a flush that lost its lease while it was slow or frozen never
starts a send -> sends it -> marks the window done. After the provider's 2xx the window is never
released: the done mark is retried (app.delivery.confirm) while the lease keeps other flushes
away. A send that certainly failed (SendGrid down, 429, a full disk) releases the window, which
goes out on a later flush; one that may have gone out (a timeout) keeps its claim until the lease
ends. A digest SendGrid rejects for good is written to the dead-letter folder and marked done.
So two flushes at once send a window once, and a failed send followed by a later one sends it
once.

A flush has a time budget (DIGEST_FLUSH_BUDGET_SECONDS): past it, it claims no more windows and
says how many it left for the next flush. One window that fails (a store error, a damaged record,
a rejection) never stops the others.

One email per window: a digest route's recipients must fit in one message of the notifier
(`max_recipients`), checked at construction. Split into batches, a partial failure would resend
the batches already accepted, since the window is claimed as a whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.config import LEASE_MARGIN_SECONDS
from app.delivery.confirm import Confirmations
from app.digests.render import render_digest
from app.digests.window import DigestItem
from app.events.models import StorageEvent
from app.files import write_json
from app.notify.base import (
    Notification,
    Notifier,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
from app.rules.base import DigestRoute
from app.rules.templates import with_footer
from app.stores.base import Lease, StoreUnavailable
from app.stores.windows import Added, DigestStore, DigestWindow, Taken

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlushResult:
    flushed: int  # windows sent and marked done
    pending: int  # windows not yet sent, after this flush (-1: not counted)
    failed: int  # windows whose send failed for now: still pending, sent by a later flush
    dead_lettered: int = 0  # windows rejected for good: in the dead-letter folder, done
    left: int = 0  # due windows this flush did not try: its time budget was spent


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
        send_seconds: float,
        budget_seconds: float = 20.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`send_seconds`: the longest one send may take (the notifier's timeout); a window is
        claimed only with that and a margin left of the flush's time, and its lease must cover
        it. `budget_seconds`: how long one flush goes on claiming windows."""
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
        if lease_seconds < send_seconds + LEASE_MARGIN_SECONDS:
            raise ValueError(
                f"a digest's lease ({lease_seconds:g} s) must cover its send ({send_seconds:g} s)"
                f" and {LEASE_MARGIN_SECONDS:g} s more"
            )
        self.store = store
        self.notifier = notifier
        self.routes = dict(routes)
        self.sender = sender
        self.dead_letters = dead_letters
        self.lease_seconds = lease_seconds
        self.send_seconds = send_seconds
        self.budget_seconds = budget_seconds
        self.clock = clock
        self.confirmations = Confirmations(clock)
        self._deadline: float | None = None  # set at SIGTERM (event loop time)

    def shutting_down(self, deadline: float) -> None:
        """SIGTERM: every flush, the one under way included, claims no window whose send could
        still be running at `deadline` (event loop time); sends under way are never cut."""
        self._deadline = deadline

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

    async def take(self, route: str, event: StorageEvent) -> Taken:
        """A `rate` route's event: may it go out now? Counts it against the period if so (once
        per change: a redelivery of a change that took an email is allowed again, uncounted)."""
        spec = self.routes[route]
        if spec.rate is None:
            raise KeyError(f"route {route!r} has no rate")
        return await self.store.take(
            spec.name, event.change_key(), spec.rate.max, spec.rate.per_seconds, self.clock()
        )

    async def overflow(
        self, route: str, event: StorageEvent, period_end: float, done_keys: Sequence[str]
    ) -> Added:
        """A `rate` route's event past the limit joins the digest sent when the period ends, and
        its email keys (`done_keys`) are marked done in the same atomic step."""
        spec = self.routes[route]
        now = self.clock()
        return await self.store.overflow(
            spec.name,
            max(period_end - now, 0.0),
            spec.max_items,
            DigestItem.of(event),
            now,
            done_keys,
        )

    async def flush(
        self,
        now: float | None = None,
        limit: int = 100,
        *,
        count_pending: bool = True,
        deadline: float | None = None,
    ) -> FlushResult:
        """Send up to `limit` due windows, earliest first, claiming them while the time budget
        lasts (and only while `deadline`, event loop time, or the shutdown's leaves time for a
        whole send).
        `now` decides which windows are due (tests move it); each claim's lease runs from the
        clock when it is made. `pending` is -1 without `count_pending` (the timer's flushes,
        every second, need not count)."""
        loop = asyncio.get_running_loop()
        budget_ends = loop.time() + self.budget_seconds
        due = await self.store.due(self.clock() if now is None else now, limit)
        flushed = failed = dead_lettered = 0
        for index, window_id in enumerate(due):
            if loop.time() >= self._stop_at(budget_ends, deadline):
                log.info(
                    "digest flush stopped at its time budget; the rest wait for the next flush",
                    extra={"left": len(due) - index, "budget_seconds": self.budget_seconds},
                )
                left = len(due) - index
                break
            outcome = await self._flush_window(window_id)
            flushed += outcome == "sent"
            failed += outcome == "failed"
            dead_lettered += outcome == "dead-lettered"
        else:
            left = 0
        pending = len(await self.store.pending(self.clock())) if count_pending else -1
        return FlushResult(flushed, pending, failed, dead_lettered, left)

    def _stop_at(self, budget_ends: float, deadline: float | None) -> float:
        """When a flush claims no more windows: its budget's end, or, at shutdown, the last
        moment a send can start and still end before SIGKILL."""
        stop = budget_ends
        for last in (deadline, self._deadline):
            if last is not None:
                stop = min(stop, last - self.send_seconds)
        return stop

    async def _flush_window(self, window_id: str) -> str:
        """Claim one window and send it: "sent", "empty" (done, nothing to tell), "skipped"
        (another flush has it, or it was sent), "lost" (the claim was lost before the send),
        "failed" (left for a later flush) or "dead-lettered" (done). A failure of this window is
        logged and never stops the flush."""
        try:
            answer = await self.store.claim(window_id, self.lease_seconds, self.clock())
            if not isinstance(answer, Lease):
                return "skipped"
            return await self._send(window_id, answer)
        except StoreUnavailable as error:
            log.warning(
                "digest not sent: the store failed; it stays pending for the next flush",
                extra={"digest_window": window_id, "reason": str(error)},
            )
        except Exception:
            log.exception(
                "digest not sent: unexpected error; it stays pending for the next flush",
                extra={"digest_window": window_id},
            )
        return "failed"

    async def _send(self, window_id: str, lease: Lease) -> str:
        """One claimed window; see _flush_window."""
        attempted = False  # once the send began, it may have gone out: the claim then stands
        try:
            window = await self.store.read(window_id)
            route = self.routes.get(window.info.route)
            if window.summary.count == 0:
                # Opened by a leading event, which went out alone, and nothing followed.
                await self.store.complete(window_id, lease.token, self.clock())
                return "empty"
            renewed = await self.store.renew(
                window_id, lease.token, self.lease_seconds, self.clock()
            )
            if renewed is None:
                log.warning(
                    "digest not sent: its claim was lost before the send (the flush was slow or"
                    " frozen past its lease); another flush sends it",
                    extra=_fields(window),
                )
                return "lost"
            lease, attempted = renewed, True
            rejected = await self._deliver(window, route)
        except UncertainDeliveryError as error:
            # It may have gone out: the claim stands until its lease ends.
            log.warning(
                "digest may or may not have been sent; its claim stands until its lease ends,"
                " then a later flush may send it",
                extra={"digest_window": window_id, "reason": error.reason},
            )
            return "failed"
        except TransientDeliveryError as error:
            await self._release(window_id, lease)
            log.warning(
                "digest not sent; it stays pending for the next flush",
                extra={"digest_window": window_id, "reason": error.reason},
            )
            return "failed"
        except BaseException:
            # A store failure, cancellation or a bug before the send: the next flush may send
            # it now. Once the send began (cut short, or a bug after it), the claim stands.
            if not attempted:
                await self._release(window_id, lease)
            raise
        await self.confirmations.confirm(
            lambda: self.store.complete(window_id, lease.token, self.clock()),
            lease.expires,
            _fields(window),
        )
        return "dead-lettered" if rejected else "sent"

    async def _deliver(self, window: DigestWindow, route: DigestRoute | None) -> bool:
        """Send the window's email, or keep it in the dead-letter folder when it can never be
        sent (its route is gone, or the provider rejected it): True then. TransientDeliveryError
        when it is to be tried again."""
        window_id = window.info.window_id
        if route is None:
            reason = f"route {window.info.route!r} is not a digest route any more"
            log.error("digest of an unknown route", extra=_fields(window, reason=reason))
            rejected = RejectedDeliveryError(reason)
        else:
            try:
                receipt = await self.notifier.send(self._notification(window, route))
            except RejectedDeliveryError as error:
                rejected = error
            else:
                self._log_sent(window, route, receipt)
                return False
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
        return True

    @staticmethod
    def _log_sent(window: DigestWindow, route: DigestRoute, receipt: Receipt) -> None:
        log.info(
            "digest sent",
            extra={
                **_fields(window),
                "notifier": receipt.notifier,
                "message_id": receipt.message_id,
                "sandbox": receipt.sandbox,
                "recipients": len(route.recipients),
            },
        )

    async def _release(self, window_id: str, lease: Lease) -> None:
        try:
            await self.store.release(window_id, lease.token, self.clock())
        except StoreUnavailable as error:
            log.warning(
                "could not release a digest's claim; it ends with its lease",
                extra={"digest_window": window_id, "reason": str(error)},
            )

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

    async def aclose(self, seconds: float) -> None:
        """At shutdown: give the done marks still being retried up to `seconds`."""
        await self.confirmations.aclose(seconds)


def _fields(window: DigestWindow, **more: object) -> dict[str, object]:
    return {
        "digest_window": window.info.window_id,
        "route": window.info.route,
        "events": window.info.events,
        **more,
    }
