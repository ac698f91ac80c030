"""What a notifier is given, what it promises, and how it fails.

A `Notification` is one email to some people. Delivery is tracked per notification (its `key`),
so one event may yield several notifications and each is sent and remembered on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol


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


class DeliveryError(Exception):
    """A notification was not accepted. `reason` is safe to log and to show a client."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TransientDeliveryError(DeliveryError):
    """Worth trying again later: timeouts, connection errors, 429, 5xx, a full disk."""


class ConfigurationError(TransientDeliveryError):
    """The fault is ours, not the message's: the provider refused our credentials or sender
    (401/403), or a request we framed wrongly (a 400 naming no field of the message), or the key
    cannot be sent at all. Retried, because nothing is lost while an operator fixes the
    configuration or the code, but logged as an ERROR."""


class RejectedDeliveryError(DeliveryError):
    """The provider rejected this message for good (a 400 naming a field of it, or 413):
    retrying cannot help."""


class Notifier(Protocol):
    name: str
    max_recipients: int | None  # per message; None for no limit

    async def send(self, notification: Notification) -> Receipt:
        """Deliver or raise a DeliveryError. Must not block the event loop."""
        ...

    async def aclose(self) -> None: ...
