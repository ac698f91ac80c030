"""The one place that decides what happens to an event.

The request is decoded into a StorageEvent. For each notification the event yields (split into
batches the notifier can take in one request): claim its key -> send -> mark it done; on a
transient failure release the claim and ask Eventarc to deliver again; on a permanent rejection
keep the event in the dead-letter box and release the claim so a replay can send. An event is
answered 2xx only once every notification has been accepted, or the event is safely
dead-lettered.

A route with a `digest` or a `rate` may hold the event back instead (`Deferred`, issue 11): it
joins the route's digest window in the digest store, durably, before the event is answered 2xx,
and the flush (app.delivery.digests) sends the window as one email.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.config import DONE_RETENTION_SECONDS
from app.delivery.deadletter import DeadLetterBox
from app.delivery.errors import InFlight
from app.events.decode import decode_event
from app.events.models import StorageEvent, UnhandledEvent
from app.notify.base import (
    ConfigurationError,
    Notification,
    Notifier,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
)
from app.rules.base import Routed, Router, Unrouted
from app.stores.base import Claim, StoreUnavailable
from app.stores.claims import IdempotencyStore

if TYPE_CHECKING:
    from app.delivery.digests import Digests

log = logging.getLogger(__name__)


CUT = "gcs-notifier: send cut short by shutdown"  # the cancel message drain() sends


class ShuttingDown(TransientDeliveryError):
    """A send cut short because the process is stopping: 503, and Eventarc delivers again."""


class Outcome(StrEnum):
    SENT = "sent"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # no route matched (or not a type this service handles)
    DROPPED = "dropped"  # a `drop: true` route matched: acknowledged, nobody told
    DEAD_LETTERED = "dead-lettered"
    DIGESTED = "digested"  # held for a digest: in the store, sent when the window closes


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    event_id: str
    sent: int = 0  # notifications accepted by this delivery


class Pipeline:
    def __init__(
        self,
        *,
        store: IdempotencyStore,
        notifier: Notifier,
        router: Router,
        dead_letters: DeadLetterBox,
        lease_seconds: float,
        digests: Digests | None = None,
    ) -> None:
        self.store = store
        self.digests = digests
        self.notifier = notifier
        self.router = router
        self.dead_letters = dead_letters
        self.lease_seconds = lease_seconds
        # The tasks sending right now, which drain() cuts short at its deadline.
        self._sending: set[asyncio.Task[Any]] = set()
        self._cut_short: set[asyncio.Task[Any]] = set()
        self._cut = False

    async def receive(self, headers: Mapping[str, str], body: bytes) -> Result:
        """An HTTP delivery's headers and body -> what became of the event."""
        event = decode_event(headers, body)
        if isinstance(event, UnhandledEvent):
            # Acknowledged: any other answer makes Eventarc retry it for 24 hours.
            log.warning(
                "event type not handled, ignored",
                extra={"event_id": event.id, "event_type": event.type, "source": event.source},
            )
            return Result(Outcome.IGNORED, event.id)
        return await self.handle(event)

    def drain(self, deadline: float) -> None:
        """The process is stopping: every send in flight, and any started from now on, ends by
        `deadline` (event loop time), so it can release its claim and answer 503 before the
        server gives up on it."""
        asyncio.get_running_loop().call_at(deadline, self._cut_sends)

    def _cut_sends(self) -> None:
        self._cut = True
        for task in self._sending:
            self._cut_short.add(task)
            task.cancel(CUT)

    async def handle(self, event: StorageEvent) -> Result:
        routed = self.router.route(event)
        now = routed.notifications
        owner = uuid.uuid4().hex
        held_back = False
        if routed.deferred:
            now, held_back = await self._defer(event, routed, owner)
        notifications = [
            batch
            for notification in now
            for batch in notification.split(self.notifier.max_recipients)
        ]
        if not notifications:
            if held_back:
                return Result(Outcome.DIGESTED, event.id)
            if routed.deferred:
                log.info("duplicate delivery, already in a digest", extra=event.log_fields())
                return Result(Outcome.DUPLICATE, event.id)
            if routed.unrouted is Unrouted.DROPPED:
                log.info("event dropped", extra={**event.log_fields(), "route": routed.route})
                return Result(Outcome.DROPPED, event.id)
            log.info("no route matched, ignored", extra=event.log_fields())
            return Result(Outcome.IGNORED, event.id)
        claimed = await self._claim_all(notifications, owner)
        if not claimed:
            if held_back:
                return Result(Outcome.DIGESTED, event.id)
            log.info("duplicate delivery, already notified", extra=event.log_fields())
            return Result(Outcome.DUPLICATE, event.id)

        held = list(claimed)  # claims this delivery must complete or release, whatever happens
        rejections: list[RejectedDeliveryError] = []
        try:
            for notification in claimed:
                try:
                    receipt = await self._send(notification)
                except RejectedDeliveryError as error:
                    rejections.append(error)
                    held.remove(notification)
                    await self.store.release(notification.key, owner)
                    continue
                except TransientDeliveryError as error:
                    if not isinstance(error, ConfigurationError):
                        log.warning(
                            "notification not sent, asking for redelivery",
                            extra={**event.log_fields(), "reason": error.reason},
                        )
                    raise
                await self.store.complete(notification.key, owner, DONE_RETENTION_SECONDS)
                held.remove(notification)
                log.info(
                    "notification sent",
                    extra={
                        **notification.context,
                        "notifier": receipt.notifier,
                        "message_id": receipt.message_id,
                        "sandbox": receipt.sandbox,
                        "recipients": len(notification.recipients),
                    },
                )
        except BaseException:
            # A failed send, a store that failed to mark one done, cancellation or a bug: give
            # back every claim still held so a redelivery can send now, not after the lease.
            await self._release(held, owner)
            raise

        sent = len(claimed) - len(rejections)
        if rejections:
            reason = "; ".join(error.reason for error in rejections)
            try:
                self.dead_letters.put(event, reason)
            except OSError as error:
                log.error(
                    "could not write the dead-letter file, asking for redelivery",
                    extra={
                        **event.log_fields(),
                        "path": str(self.dead_letters.directory),
                        "reason": error.strerror or type(error).__name__,
                    },
                )
                raise TransientDeliveryError(
                    f"could not write the dead-letter file in DEAD_LETTER_DIR: {error.strerror}"
                ) from error
            return Result(Outcome.DEAD_LETTERED, event.id, sent)
        return Result(Outcome.SENT, event.id, sent)

    async def _defer(
        self, event: StorageEvent, routed: Routed, owner: str
    ) -> tuple[list[Notification], bool]:
        """Join the event to the digests of the routes that hold it back (durably: the store has
        it when this returns) -> the notifications to send now (the immediate routes', a leading
        event's, a rate route's under its limit), and whether a digest newly holds the event."""
        digests = self.digests
        if digests is None:
            raise RuntimeError("a digest or rate route needs the digest store")
        now = list(routed.notifications)
        held_back = False
        for entry in routed.deferred:
            if not entry.rate:
                added = await digests.join(entry.route, event)
                if added.leading:  # the first after a quiet spell: alone, at once
                    now.append(entry.notification())
                    continue
                if added.duplicate:
                    continue
            else:
                taken = await digests.take(entry.route)
                notification = entry.notification()
                if taken.allowed:
                    now.append(notification)
                    continue
                held = await self._hold_for_period(
                    digests, entry.route, notification, event, taken.period_end, owner
                )
                if held is None:
                    continue  # it went out alone before: a redelivery
                if not held:
                    now.append(notification)  # partly sent by an earlier delivery: finish it
                    continue
            held_back = True
            log.info("event held for a digest", extra={**event.log_fields(), "route": entry.route})
        # The SQLite digest store answers without suspending, so a held event would go from
        # request to answer without once letting the loop serve the other connections. At 80
        # connections that starved some of them: p99 230-350 ms against 25-50 ms with this one
        # yield, which also raised events/s from about 4,300 to 5,100 (wrk, 1 digest route).
        await asyncio.sleep(0)
        return now, held_back

    async def _hold_for_period(
        self,
        digests: Digests,
        route: str,
        notification: Notification,
        event: StorageEvent,
        period_end: float,
        owner: str,
    ) -> bool | None:
        """A rate route past its limit: the event joins the digest sent when the period ends
        (True), unless an earlier delivery of it already went out alone (None: nothing to do)
        or in part (False: send the rest now). Its keys are then marked done, so a redelivery in
        the next period does not email it alone as well."""
        batches = notification.split(self.notifier.max_recipients)
        claimed = await self._claim_all(batches, owner)
        if len(claimed) < len(batches):
            await self._release(claimed, owner)
            return False if claimed else None
        try:
            await digests.overflow(route, event, period_end)
        except BaseException:
            await self._release(claimed, owner)
            raise
        for batch in claimed:
            await self.store.complete(batch.key, owner, DONE_RETENTION_SECONDS)
        return True

    async def _send(self, notification: Notification) -> Receipt:
        # A set of tasks rather than an asyncio.timeout per send: this runs for every email, and
        # the deadline matters only once, at shutdown.
        if self._cut:
            raise ShuttingDown("the service is shutting down; deliver again")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Pipeline.handle runs inside an asyncio task")
        self._sending.add(task)
        try:
            return await self.notifier.send(notification)
        except asyncio.CancelledError:
            if task not in self._cut_short:
                raise  # cancelled by someone else: the server, a client gone
            self._cut_short.discard(task)
            task.uncancel()
            raise ShuttingDown("the service is shutting down; deliver again") from None
        finally:
            self._sending.discard(task)

    async def _claim_all(self, notifications: list[Notification], owner: str) -> list[Notification]:
        """Claim every key not yet done; if any is in flight elsewhere, hold none of them."""
        claimed: list[Notification] = []
        in_flight = False
        try:
            for notification in notifications:
                state = await self.store.claim(notification.key, owner, self.lease_seconds)
                if state is Claim.CLAIMED:
                    claimed.append(notification)
                elif state is Claim.IN_FLIGHT:
                    in_flight = True
        except BaseException:
            await self._release(claimed, owner)
            raise
        if in_flight:
            await self._release(claimed, owner)
            raise InFlight("another delivery of this change is being sent")
        return claimed

    async def _release(self, notifications: list[Notification], owner: str) -> None:
        """Release each claim, going on past a store failure (the lease ends those claims)."""
        for notification in notifications:
            try:
                await self.store.release(notification.key, owner)
            except StoreUnavailable as error:
                log.warning(
                    "could not release a claim; it ends with its lease",
                    extra={**notification.context, "reason": str(error)},
                )
