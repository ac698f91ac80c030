"""What a notifier is given, what it promises, and how it fails.

A `Notification` is one email to some people. Delivery is tracked per notification (its `key`),
so one event may yield several notifications and each is sent and remembered on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from app.notify.errors import (
    ConfigurationError,
    DeliveryError,
    RejectedDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)

__all__ = [
    "ConfigurationError",
    "DeliveryError",
    "Notification",
    "Notifier",
    "Receipt",
    "RejectedDeliveryError",
    "TransientDeliveryError",
    "UncertainDeliveryError",
]


@dataclass(frozen=True, slots=True)
class Notification:
    key: str  # names this notification for deduplication; unique per storage change
    subject: str
    text: str
    html: str
    recipients: tuple[str, ...]
    sender: str
    context: dict[str, str] = field(default_factory=dict)  # log fields: event id, bucket, ...

    def split(self, max_recipients: int | None) -> list[Notification]:
        """One notification per batch of at most `max_recipients`, each with its own key, so a
        redelivery after a partial failure resends only the batches not yet accepted."""
        if max_recipients is None or len(self.recipients) <= max_recipients:
            return [self]
        return [
            replace(
                self,
                key=f"{self.key}#{start // max_recipients}",
                recipients=self.recipients[start : start + max_recipients],
            )
            for start in range(0, len(self.recipients), max_recipients)
        ]


@dataclass(frozen=True, slots=True)
class Receipt:
    notifier: str
    message_id: str | None = None
    sandbox: bool = False


class Notifier(Protocol):
    name: str
    max_recipients: int | None  # per message; None for no limit
    send_seconds: float  # the longest one send may take: a claim's lease must cover it

    async def send(self, notification: Notification) -> Receipt:
        """Deliver or raise a DeliveryError. Must not block the event loop."""
        ...

    async def aclose(self) -> None: ...
