"""What a router is: StorageEvent in, the notifications it yields out (or why none).

Light on purpose: the pipeline imports this, and the default path never loads YAML or Jinja2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from app.rules.errors import RulesUnavailable

__all__ = [
    "Deferred",
    "DigestRoute",
    "RateLimit",
    "Routed",
    "Router",
    "RulesUnavailable",
    "Unrouted",
]

if TYPE_CHECKING:  # the app imports this module at start-up; the event models load lazily
    from app.events.models import StorageEvent
    from app.notify.base import Notification
    from app.rules.templates import DigestTemplates


class Unrouted(StrEnum):
    NO_ROUTE = "no route matched"
    DROPPED = "dropped by a route"


@dataclass(frozen=True, slots=True)
class RateLimit:
    max: int  # emails per period
    per_seconds: float


@dataclass(frozen=True, slots=True)
class DigestRoute:
    """A route whose events may wait for a digest: a `digest` route (`rate` None: windows of
    `window_seconds`, the first event after a quiet spell alone when `leading`) or a `rate`
    route (its overflow waits until the period ends)."""

    name: str
    recipients: tuple[str, ...]
    window_seconds: float
    max_items: int
    leading: bool = False
    rate: RateLimit | None = None
    templates: DigestTemplates | None = None  # the route's own subject/text/html for digests


@dataclass(frozen=True, slots=True)
class Deferred:
    """A route that may hold the event back for a digest (issue 11).

    A `digest` route (`rate=False`) joins the event to the route's window; when the event opens a
    window after a quiet spell and the route has `leading: true`, it goes out alone at once
    instead. A `rate` route (`rate=True`) sends it at once while the route is under its limit,
    and otherwise joins the period's digest. `notification` builds the email sent at once, only
    when it is (rendering costs more than joining)."""

    route: str
    notification: Callable[[], Notification]
    rate: bool = False


@dataclass(frozen=True, slots=True)
class Routed:
    """What an event yields: notifications to send now and routes that may hold it for a
    digest, or why neither (`unrouted`, and the dropping route)."""

    notifications: list[Notification]
    unrouted: Unrouted | None = None
    route: str | None = None
    deferred: tuple[Deferred, ...] = ()


class Router(Protocol):
    @property
    def size(self) -> int:
        """How many routes it has."""
        ...

    def route(self, event: StorageEvent) -> Routed: ...

    def digest_routes(self) -> Mapping[str, DigestRoute]:
        """The routes with a `digest` or a `rate`, by name: whom a flush tells about a window,
        even after a restart, before any new event."""
        ...
