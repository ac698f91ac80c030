"""The router without a rules file: every event of the four types to NOTIFY_TO, today's email
(in the words of app.notify.render.VERBS), deduplicated on the storage change alone (the keys of
stores written before rules existed). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from app.events.models import StorageEvent
from app.notify.base import Notification
from app.notify.render import VERBS, render
from app.rules.base import Routed, Unrouted

if TYPE_CHECKING:
    from app.rules.base import DigestRoute


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


def notifications_for(
    event: StorageEvent, recipients: tuple[str, ...], sender: str
) -> list[Notification]:
    verb = VERBS.get(event.type)
    if verb is None:
        return []
    rendered = render(event, verb)
    return [
        Notification(
            key=event.change_key(),
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            recipients=recipients,
            sender=sender,
            context=event.log_fields(),
        )
    ]
