"""The one place that decides what happens to an event.

The request is decoded into a StorageEvent. For each notification the event yields (split into
batches the notifier can take in one request): claim its key (a fenced lease, app.stores.base)
-> check the claim is still ours right before sending -> send -> mark it done. What happens when
something fails depends on what is known about the send:
- it certainly did not go out (refused connection, an error status, a claim the store refused):
  the claim is released and Eventarc asked to deliver again (503), so the redelivery sends now;
- it may have gone out (a timeout, a connection that broke after the request was written, a send
  cut short at shutdown): the claim stands until its lease ends and the event is answered 503;
  a redelivery meanwhile is told the change is in flight (409);
- it went out (the provider's 2xx): never sent again by this service. The done mark is retried
  within the request, then in the background while the lease lasts (app.delivery.confirm), and
  the answer is 2xx whatever the store says, since the email has gone;
- the provider rejected it for good: the event is kept in the dead-letter box and the claim
  released, so a replay can send.
An event is answered 2xx only once every notification has been accepted, or the event is safely
dead-lettered.

A replay (a file of the dead-letter box, posted by `python -m app.replay`, or a message Pub/Sub
forwarded to the dead-letter topic and the README's procedure pushes back) of a change older than
the retention (DEDUPE_RETENTION, by the event's time) is not sent: its done marks may be gone, so
an event that had partly gone out would be emailed again. It is kept in the dead-letter box with
the reason and answered 2xx; `python -m app.replay --force` sends it all the same, with the
REPLAY_HEADER this service then honours. Deliveries that are not replays are never older than
Eventarc's 24 hours or Pub/Sub's dead-letter policy, both inside the retention.

A route with a `digest` or a `rate` may hold the event back instead (`Deferred`, issue 11): it
joins the route's digest window in the digest store, durably, before the event is answered 2xx,
and the flush (app.delivery.digests) sends the window as one email. A `rate` route past its limit
joins the period's digest and marks its email keys done in one atomic step of the store, so a
redelivery finds the change done: it neither emails it alone nor spends the rate budget again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.config import LEASE_MARGIN_SECONDS
from app.delivery.confirm import Confirmations
from app.delivery.deadletter import DEAD_LETTERED_AT, REPLAY_HEADER, DeadLetterBox
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
    UncertainDeliveryError,
)
from app.rules.base import Deferred, Routed, Router, Unrouted
from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.claims import IdempotencyStore

if TYPE_CHECKING:
    from app.delivery.digests import Digests

log = logging.getLogger(__name__)


CUT = "gcs-notifier: send cut short by shutdown"  # the cancel message drain() sends
# The extensions that make an event a replay: the dead-letter box's, and Pub/Sub's on a message it
# forwarded to a dead-letter topic (app.events.pubsub keeps it, lower-cased).
REPLAYED = frozenset({DEAD_LETTERED_AT, "cloudpubsubdeadlettersourcesubscription"})
# A claim the store granted less than this long ago is the check before its send: a second
# round trip would only tell again what the claim just said.
FRESH_SECONDS = 1.0


class ShuttingDown(UncertainDeliveryError):
    """A send cut short because the process is stopping: it may have gone out, so its claim
    stands until its lease ends; 503, and Eventarc delivers again."""


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
    unconfirmed: int = 0  # of those, accepted but not yet marked done (retried in the background)


@dataclass(slots=True)
class Held:
    """A notification this delivery holds the claim of."""

    notification: Notification
    lease: Lease
    checked: float  # loop time when the store last granted or renewed the lease


class Pipeline:
    def __init__(
        self,
        *,
        store: IdempotencyStore,
        notifier: Notifier,
        router: Router,
        dead_letters: DeadLetterBox,
        lease_seconds: float,
        send_seconds: float,
        retention_seconds: float,
        digests: Digests | None = None,
    ) -> None:
        """`send_seconds`: the longest one send may take (the notifier's timeout); a claim is
        renewed before a send unless more than that, and a margin, are left of its lease.
        `retention_seconds`: how long done marks last; an older change is not sent."""
        self.store = store
        self.digests = digests
        self.notifier = notifier
        self.router = router
        self.dead_letters = dead_letters
        self.lease_seconds = lease_seconds
        self.send_seconds = send_seconds
        self.retention_seconds = retention_seconds
        self.confirmations = Confirmations()
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
        if headers.get(REPLAY_HEADER) != "force" and self._stale_replay(event):
            return self._keep_too_old(event)
        return await self.handle(event)

    def _stale_replay(self, event: StorageEvent) -> bool:
        replay = REPLAYED.intersection(event.extensions)
        if not replay or event.time is None:
            return False
        age = time.time() - event.time.timestamp()
        return age > self.retention_seconds

    def _keep_too_old(self, event: StorageEvent) -> Result:
        days = self.retention_seconds / 86400
        reason = (
            f"the change is older than DEDUPE_RETENTION ({days:g} days): its done marks may be"
            " gone, so it was not sent, lest it be emailed twice; check, then send it with"
            " python -m app.replay --force"
        )
        self._dead_letter(event, reason)
        return Result(Outcome.DEAD_LETTERED, event.id)

    def drain(self, deadline: float) -> None:
        """The process is stopping: every send in flight, and any started from now on, ends by
        `deadline` (event loop time), so its request is answered 503 before the server gives up
        on it."""
        asyncio.get_running_loop().call_at(deadline, self._cut_sends)

    def _cut_sends(self) -> None:
        self._cut = True
        for task in self._sending:
            self._cut_short.add(task)
            task.cancel(CUT)

    async def aclose(self, seconds: float) -> None:
        """At shutdown: give the done marks still being retried up to `seconds`."""
        await self.confirmations.aclose(seconds)

    async def handle(self, event: StorageEvent) -> Result:
        routed = self.router.route(event)
        notifications = [
            batch
            for notification in routed.notifications
            for batch in notification.split(self.notifier.max_recipients)
        ]
        held: list[Held] = []
        held_back = False
        if routed.deferred:
            held, held_back = await self._defer(event, routed.deferred)
        try:
            held += await self._claim_all(notifications)
        except BaseException:
            await self._release(held)
            raise
        if not held:
            return self._nothing_to_send(event, routed, held_back)
        return await self._deliver(event, held)

    def _nothing_to_send(self, event: StorageEvent, routed: Routed, held_back: bool) -> Result:
        if held_back:
            return Result(Outcome.DIGESTED, event.id)
        if routed.deferred:
            log.info("duplicate delivery, already in a digest or sent", extra=event.log_fields())
            return Result(Outcome.DUPLICATE, event.id)
        if routed.notifications:
            log.info("duplicate delivery, already notified", extra=event.log_fields())
            return Result(Outcome.DUPLICATE, event.id)
        if routed.unrouted is Unrouted.DROPPED:
            log.info("event dropped", extra={**event.log_fields(), "route": routed.route})
            return Result(Outcome.DROPPED, event.id)
        log.info("no route matched, ignored", extra=event.log_fields())
        return Result(Outcome.IGNORED, event.id)

    async def _deliver(self, event: StorageEvent, held: list[Held]) -> Result:
        """Send each held notification; every claim is completed, released (when its send
        certainly failed, or never started) or left to its lease (when its send may have gone
        out), whatever happens."""
        unsettled = list(held)  # claims to release if this delivery stops short
        rejections: list[RejectedDeliveryError] = []
        sent = unconfirmed = 0
        try:
            for claim in held:
                if not await self._still_ours(claim):
                    unsettled.remove(claim)  # sent by another delivery meanwhile
                    continue
                notification = claim.notification
                try:
                    receipt = await self._send(notification)
                except RejectedDeliveryError as error:
                    rejections.append(error)
                    unsettled.remove(claim)
                    await self._release([claim])
                    continue
                except TransientDeliveryError as error:
                    if isinstance(error, UncertainDeliveryError):
                        unsettled.remove(claim)  # it may have gone out: the claim stands
                        self._log_uncertain(notification, error.reason)
                        # A redelivery before the lease ends would only be told 409.
                        error.retry_after = max(claim.lease.expires - time.time(), 1.0)
                    elif not isinstance(error, ConfigurationError):
                        log.warning(
                            "notification not sent, asking for redelivery",
                            extra={**event.log_fields(), "reason": error.reason},
                        )
                    raise
                except BaseException as error:
                    # Cancelled (the server, a client gone) or a bug inside the notifier: the
                    # request may have been written, so the claim stands as for a timeout.
                    unsettled.remove(claim)
                    self._log_uncertain(notification, type(error).__name__)
                    raise
                unsettled.remove(claim)
                sent += 1
                self._log_sent(notification, receipt)
                if not await self._confirm(claim):
                    unconfirmed += 1
        except BaseException:
            # A failed send, a store that failed, cancellation or a bug: give back every claim
            # whose send never started or certainly failed, so a redelivery can send now.
            await self._release(unsettled)
            raise
        if rejections:
            self._dead_letter(event, "; ".join(error.reason for error in rejections))
            return Result(Outcome.DEAD_LETTERED, event.id, sent, unconfirmed)
        if not sent:
            log.info("duplicate delivery, sent by another delivery", extra=event.log_fields())
            return Result(Outcome.DUPLICATE, event.id)
        return Result(Outcome.SENT, event.id, sent, unconfirmed)

    @staticmethod
    def _log_uncertain(notification: Notification, reason: str) -> None:
        log.warning(
            "notification may or may not have been sent; its claim stands until its lease"
            " ends, then a redelivery may send it",
            extra={**notification.context, "reason": reason},
        )

    @staticmethod
    def _log_sent(notification: Notification, receipt: Receipt) -> None:
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

    def _dead_letter(self, event: StorageEvent, reason: str) -> None:
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

    async def _still_ours(self, claim: Held) -> bool:
        """Right before a send: whether the claim still holds, and for long enough to cover the
        send. A claim the store granted a moment ago does; else the store renews it, and a claim
        that was lost (its lease ran out) is claimed anew, fenced like any other: True to send,
        False when the key was sent meanwhile, InFlight when another delivery holds it now."""
        loop = asyncio.get_running_loop()
        left = claim.lease.expires - time.time()
        if loop.time() - claim.checked < FRESH_SECONDS and left >= self._needed():
            return True
        key = claim.notification.key
        renewed = await self.store.renew(key, claim.lease.token, self.lease_seconds)
        answer: Lease | Claim = renewed or await self.store.claim(key, self.lease_seconds)
        if isinstance(answer, Lease):
            claim.lease, claim.checked = answer, loop.time()
            return True
        if answer is Claim.DONE:
            return False
        raise InFlight("another delivery of this change is being sent")

    def _needed(self) -> float:
        return self.send_seconds + LEASE_MARGIN_SECONDS

    async def _confirm(self, claim: Held) -> bool:
        key, token = claim.notification.key, claim.lease.token
        return await self.confirmations.confirm(
            lambda: self.store.complete(key, token),
            claim.lease.expires,
            claim.notification.context,
        )

    async def _defer(
        self, event: StorageEvent, deferred: tuple[Deferred, ...]
    ) -> tuple[list[Held], bool]:
        """Join the event to the digests of the routes that hold it back (durably: the store has
        it when this returns) -> the claims of what to send now (a leading event's, a rate
        route's under its limit or partly sent before), and whether a digest newly holds the
        event. A leading event's notification is claimed with the others, later."""
        digests = self.digests
        if digests is None:
            raise RuntimeError("a digest or rate route needs the digest store")
        held: list[Held] = []
        held_back = False
        try:
            for entry in deferred:
                if entry.rate:
                    claims, overflowed = await self._rate(digests, entry, event)
                    held += claims
                    held_back |= overflowed
                    continue
                added = await digests.join(entry.route, event)
                if added.leading:  # the first after a quiet spell: alone, at once
                    notification = entry.notification()
                    held += await self._claim_all(notification.split(self.notifier.max_recipients))
                elif not added.duplicate:
                    held_back = True
                    log.info(
                        "event held for a digest",
                        extra={**event.log_fields(), "route": entry.route},
                    )
        except BaseException:
            await self._release(held)
            raise
        # The SQLite digest store answers without suspending, so a held event would go from
        # request to answer without once letting the loop serve the other connections. At 80
        # connections that starved some of them: p99 230-350 ms against 25-50 ms with this one
        # yield, which also raised events/s from about 4,300 to 5,100 (wrk, 1 digest route).
        await asyncio.sleep(0)
        return held, held_back

    async def _rate(
        self, digests: Digests, entry: Deferred, event: StorageEvent
    ) -> tuple[list[Held], bool]:
        """A rate route's event: its claims to send now, or none and True when it joined the
        period's digest. Claimed first, so a change already sent (alone or in a digest) is a
        duplicate before it spends the rate budget."""
        notification = entry.notification()
        batches = notification.split(self.notifier.max_recipients)
        claims = await self._claim_all(batches)
        if len(claims) < len(batches):
            return claims, False  # all sent before (a redelivery), or partly: finish those
        try:
            taken = await digests.take(entry.route, event)
            if taken.allowed:
                return claims, False
            keys = [batch.key for batch in batches]
            await digests.overflow(entry.route, event, taken.period_end, keys)
        except BaseException:
            await self._release(claims)
            raise
        # The overflow marked the keys done in the same step: the claims need no release.
        log.info("event held for a digest", extra={**event.log_fields(), "route": entry.route})
        return [], True

    async def _send(self, notification: Notification) -> Receipt:
        # A set of tasks rather than an asyncio.timeout per send: this runs for every email, and
        # the deadline matters only once, at shutdown.
        if self._cut:
            raise TransientDeliveryError("the service is shutting down; deliver again")
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

    async def _claim_all(self, notifications: list[Notification]) -> list[Held]:
        """Claim every key not yet done; if any is in flight elsewhere, hold none of them."""
        claimed: list[Held] = []
        in_flight = False
        loop = asyncio.get_running_loop()
        try:
            for notification in notifications:
                answer = await self.store.claim(notification.key, self.lease_seconds)
                if isinstance(answer, Lease):
                    claimed.append(Held(notification, answer, loop.time()))
                elif answer is Claim.IN_FLIGHT:
                    in_flight = True
        except BaseException:
            await self._release(claimed)
            raise
        if in_flight:
            await self._release(claimed)
            raise InFlight("another delivery of this change is being sent")
        return claimed

    async def _release(self, claims: list[Held]) -> None:
        """Release each claim, going on past a store failure (the lease ends those claims)."""
        for claim in claims:
            try:
                await self.store.release(claim.notification.key, claim.lease.token)
            except StoreUnavailable as error:
                log.warning(
                    "could not release a claim; it ends with its lease",
                    extra={**claim.notification.context, "reason": str(error)},
                )
