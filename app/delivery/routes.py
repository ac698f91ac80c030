"""Which notifications an event yields: a plain mapping from event type to a function.

Adding a type is one function and one line in ROUTES. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.events.models import EventType, StorageEvent
from app.notify.base import Notification
from app.notify.render import Rendered, render


def on_finalized(event: StorageEvent) -> Rendered:
    return render(event, "was uploaded")


def on_deleted(event: StorageEvent) -> Rendered:
    return render(event, "was deleted")


def on_archived(event: StorageEvent) -> Rendered:
    return render(event, "was archived (it is now a noncurrent version)")


def on_metadata_updated(event: StorageEvent) -> Rendered:
    return render(event, "had its metadata updated")


ROUTES: Mapping[EventType, Callable[[StorageEvent], Rendered]] = {
    EventType.FINALIZED: on_finalized,
    EventType.DELETED: on_deleted,
    EventType.ARCHIVED: on_archived,
    EventType.METADATA_UPDATED: on_metadata_updated,
}


def notifications_for(
    event: StorageEvent, recipients: tuple[str, ...], sender: str
) -> list[Notification]:
    route = ROUTES.get(event.type)
    if route is None:
        return []
    rendered = route(event)
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
