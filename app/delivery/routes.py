"""Which notifications an event yields without a rules file: today's email, in the words of
app.notify.render.VERBS, to everyone. Pure: no I/O.
"""

from __future__ import annotations

from app.events.models import StorageEvent
from app.notify.base import Notification
from app.notify.render import VERBS, render


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
