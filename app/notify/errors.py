"""How a notification fails; importable without the rest of app.notify (the app's exception
handlers import this at start-up)."""

from __future__ import annotations


class DeliveryError(Exception):
    """A notification was not accepted. `reason` is safe to log and to show a client."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TransientDeliveryError(DeliveryError):
    """Worth trying again later: timeouts, connection errors, 429, 5xx, a full disk."""


class UncertainDeliveryError(TransientDeliveryError):
    """The request may have reached the provider and been accepted: it timed out or its
    connection broke after it was sent, or the send was cut short. Worth trying again, but not
    at once: the claim stands until its lease ends, so a redelivery in the meantime is told the
    change is in flight, and only one that comes after the lease may send (a second email if
    the first was accepted after all: the provider has no idempotency key)."""


class ConfigurationError(TransientDeliveryError):
    """The fault is ours, not the message's: the provider refused our credentials or sender
    (401/403), or a request we framed wrongly (a 400 naming no field of the message), or the key
    cannot be sent at all. Retried, because nothing is lost while an operator fixes the
    configuration or the code, but logged as an ERROR."""


class RejectedDeliveryError(DeliveryError):
    """The provider rejected this message for good (a 400 naming a field of it, or 413):
    retrying cannot help."""
