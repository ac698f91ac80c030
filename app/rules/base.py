"""What a router is: StorageEvent in, the notifications it yields out (or why none).

Light on purpose: the pipeline imports this, and the default path never loads YAML or Jinja2.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from app.rules.errors import RulesUnavailable

__all__ = ["Routed", "Router", "RulesUnavailable", "Unrouted"]

if TYPE_CHECKING:  # the app imports this module at start-up; the event models load lazily
    from app.events.models import StorageEvent
    from app.notify.base import Notification


class Unrouted(StrEnum):
    NO_ROUTE = "no route matched"
    DROPPED = "dropped by a route"


@dataclass(frozen=True, slots=True)
class Routed:
    """What an event yields: notifications, or why none (`unrouted`, and the dropping route)."""

    notifications: list[Notification]
    unrouted: Unrouted | None = None
    route: str | None = None


class Router(Protocol):
    @property
    def size(self) -> int:
        """How many routes it has."""
        ...

    def route(self, event: StorageEvent) -> Routed: ...
