"""The router without a rules file: every event of the four types to NOTIFY_TO, today's email,
deduplicated on the storage change alone (the keys of stores written before rules existed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from app.delivery.routes import notifications_for
from app.events.models import StorageEvent
from app.rules.base import Routed, Unrouted

if TYPE_CHECKING:
    from app.digests.flush import DigestRoute


class DefaultRouter:
    """No rules file: every event of the four types to the same recipients, today's email."""

    def __init__(self, recipients: tuple[str, ...], sender: str) -> None:
        self.recipients = recipients
        self.sender = sender

    size = 1

    def route(self, event: StorageEvent) -> Routed:
        notifications = notifications_for(event, self.recipients, self.sender)
        return Routed(notifications, None if notifications else Unrouted.NO_ROUTE)

    def digest_routes(self) -> Mapping[str, DigestRoute]:
        return {}
