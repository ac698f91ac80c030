"""The local outbox in the browser (/outbox): the `.eml` files the outbox notifier wrote, listed
newest first, updated live, each readable as its recipient would see it.

A tool for writing rules and templates on one's own machine, so it exists only when the outbox
notifier runs without event authentication (NOTIFIER=outbox, EVENT_AUTH=none): a deployed service
never serves it. The routes are app/api/outbox.py; mailbox.py reads the files, feed.py carries
new ones to open pages (Server-Sent Events), pages.py renders the templates.
"""

from __future__ import annotations

from app.config import Settings


def enabled(settings: Settings) -> bool:
    return settings.notifier == "outbox" and settings.event_auth == "none"
