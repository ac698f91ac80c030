"""The one place that decides what happens to an event.

The request is decoded into a StorageEvent. For each notification the event yields (split into
batches the notifier can take in one request): claim its key -> send -> mark it done; on a
transient failure release the claim and ask Eventarc to deliver again; on a permanent rejection
keep the event in the dead-letter box and release the claim so a replay can send. An event is
answered 2xx only once every notification has been accepted, or the event is safely
dead-lettered.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from app.config import DONE_RETENTION_SECONDS
from app.delivery.deadletter import DeadLetterBox
from app.delivery.routes import notifications_for
from app.delivery.store import Claim, IdempotencyStore, InFlight
from app.events.decode import decode_event
from app.events.models import StorageEvent, UnhandledEvent
from app.notify.base import (
    ConfigurationError,
    Notification,
    Notifier,
    RejectedDeliveryError,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    SENT = "sent"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    DEAD_LETTERED = "dead-lettered"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    event_id: str
    sent: int = 0  # notifications accepted by this delivery


@dataclass(frozen=True, slots=True)
class Audience:
    recipients: tuple[str, ...]
    sender: str


class Pipeline:
    def __init__(
        self,
        *,
        store: IdempotencyStore,
        notifier: Notifier,
        audience: Audience,
        dead_letters: DeadLetterBox,
        lease_seconds: float,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.audience = audience
        self.dead_letters = dead_letters
        self.lease_seconds = lease_seconds

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

    async def handle(self, event: StorageEvent) -> Result:
        notifications = [
            batch
            for notification in notifications_for(
                event, self.audience.recipients, self.audience.sender
            )
            for batch in notification.split(self.notifier.max_recipients)
        ]
        if not notifications:
            return Result(Outcome.IGNORED, event.id)
        owner = uuid.uuid4().hex
        claimed = await self._claim_all(notifications, owner)
        if not claimed:
            log.info("duplicate delivery, already notified", extra=event.log_fields())
            return Result(Outcome.DUPLICATE, event.id)

        rejections: list[RejectedDeliveryError] = []
        for index, notification in enumerate(claimed):
            try:
                receipt = await self.notifier.send(notification)
            except RejectedDeliveryError as error:
                rejections.append(error)
                await self.store.release(notification.key, owner)
                continue
            except TransientDeliveryError as error:
                await self._release(claimed[index:], owner)
                if not isinstance(error, ConfigurationError):
                    log.warning(
                        "notification not sent, asking for redelivery",
                        extra={**event.log_fields(), "reason": error.reason},
                    )
                raise
            except BaseException:
                # Cancelled or a bug: let a redelivery try again now rather than after the lease.
                await self._release(claimed[index:], owner)
                raise
            await self.store.complete(notification.key, owner, DONE_RETENTION_SECONDS)
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

        sent = len(claimed) - len(rejections)
        if rejections:
            reason = "; ".join(error.reason for error in rejections)
            try:
                self.dead_letters.put(event, reason)
            except OSError as error:
                raise TransientDeliveryError(
                    f"could not write the dead-letter file: {error.strerror}"
                ) from error
            return Result(Outcome.DEAD_LETTERED, event.id, sent)
        return Result(Outcome.SENT, event.id, sent)

    async def _claim_all(self, notifications: list[Notification], owner: str) -> list[Notification]:
        """Claim every key not yet done; if any is in flight elsewhere, hold none of them."""
        claimed: list[Notification] = []
        in_flight = False
        for notification in notifications:
            state = await self.store.claim(notification.key, owner, self.lease_seconds)
            if state is Claim.CLAIMED:
                claimed.append(notification)
            elif state is Claim.IN_FLIGHT:
                in_flight = True
        if in_flight:
            await self._release(claimed, owner)
            raise InFlight("another delivery of this change is being sent")
        return claimed

    async def _release(self, notifications: list[Notification], owner: str) -> None:
        for notification in notifications:
            await self.store.release(notification.key, owner)
