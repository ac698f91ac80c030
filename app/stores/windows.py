"""Where digest windows wait for their flush, durably (issue 11; not wired into the service yet:
the pipeline, the flush timer, POST /digests/flush and GET /digests will use this Protocol).

A route with a digest has at most one OPEN window at a time. Each window moves

    OPEN --claim--> SENDING --complete--> DONE (purged after the retention)
                       |  ^
               release |  | claim (again, by the next flush)
                       v  |
                    RELEASED

- `add` joins an event to the route's OPEN window, or opens one (due `window_seconds` later);
  the same storage change joins a route's windows once while it is remembered (the retention).
  With `leading_after`, an event that opens a window after a quiet spell is the window's
  LEADING change: the caller sends it at once, alone, and the window opens empty (count 0)
  for the events that follow; an empty window is completed without an email.
- `claim` closes the window to new events: an event arriving while it is being sent opens the
  route's next window, so every event is in exactly one email.
- A SENDING window whose lease ran out (its sender died) and a RELEASED one (its send failed)
  are due again, as is an OPEN window past its due time; `due` lists them.

`take` counts a `rate` route's emails in periods: the first email after a period ended starts
the next one, and an email over the limit is not allowed (the caller adds it to a digest).

The idempotency claims of single emails are a separate Protocol (app.stores.claims); the two
share `Claim` and `StoreUnavailable`. Key hashing and retention live here, once, for every
backend. Every method takes `now` (seconds since the epoch) from the caller, so one clock decides
and tests can move it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from app.config import DONE_RETENTION_SECONDS
from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim, StoreUnavailable

__all__ = [
    "RETENTION_SECONDS",
    "Added",
    "Claim",
    "DigestStore",
    "DigestWindow",
    "StoreUnavailable",
    "Taken",
    "UnknownWindow",
    "WindowInfo",
    "WindowState",
    "change_digest",
    "window_id",
]

# A change key is remembered this long after it joined a window, and a done window is kept this
# long after its email: longer than Eventarc's 24 hours of redelivery, as for single emails.
RETENTION_SECONDS = DONE_RETENTION_SECONDS


class WindowState(StrEnum):
    OPEN = "open"  # collecting events
    SENDING = "sending"  # claimed by a flush; closed to new events
    RELEASED = "released"  # its send failed; due again, still closed to new events
    DONE = "done"  # sent


class UnknownWindow(LookupError):
    """No such window: never opened, or done and purged after the retention."""


@dataclass(frozen=True, slots=True)
class Added:
    """What `add` did with one event.

    `previous_closed_at` is when the route's previous window was closed to new events (its first
    claim, or its completion), or None if the route never had one.

    `leading`: the event is the window's leading change (see `DigestStore.add`), not in its
    summary: the caller sends it alone, at once. A duplicate of a leading change is leading
    too, so a redelivery sends it again (the idempotency store makes that one email)."""

    window_id: str
    duplicate: bool  # the change had already joined a window of this route: nothing was added
    opened: bool  # this event opened the window
    previous_closed_at: float | None
    leading: bool = False


@dataclass(frozen=True, slots=True)
class Taken:
    """What `take` did: `used` emails of the period ending at `period_end` (this one included
    when `allowed`)."""

    allowed: bool
    period_end: float
    used: int


@dataclass(frozen=True, slots=True)
class WindowInfo:
    window_id: str
    route: str
    opened_at: float
    due_at: float
    events: int
    state: WindowState


@dataclass(frozen=True, slots=True)
class DigestWindow:
    info: WindowInfo
    summary: DigestSummary


class DigestStore(Protocol):
    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        """Atomic and durable before it returns (StoreUnavailable otherwise).

        When this event opens the route's window, `leading_after` is not None, and the route
        never had a window or closed its previous one at least `leading_after` seconds ago,
        the window opens EMPTY and remembers the event as its leading change (Added.leading);
        the route's next events join it as usual."""
        ...

    async def take(self, route: str, limit: int, per_seconds: float, now: float) -> Taken:
        """One email of a rate route: allowed while fewer than `limit` were taken in the
        route's current period. With no period, or `now` at or after its end, a new period
        [now, now + per_seconds) starts with this email. Atomic, and durable before it returns
        (StoreUnavailable otherwise); ValueError for a limit below 1 or a period of 0 or less."""
        ...

    async def due(self, now: float, limit: int) -> list[str]:
        """Windows to flush, earliest first: OPEN ones past their due time, RELEASED ones, and
        SENDING ones whose lease ran out."""
        ...

    async def claim(self, window_id: str, owner: str, lease_seconds: float, now: float) -> Claim:
        """CLAIMED closes the window and makes `owner` its sender until the lease runs out (an
        owner claiming again just extends it); IN_FLIGHT while another owner's lease runs; DONE
        when it was sent, or is unknown (purged): nothing is left to send."""
        ...

    async def read(self, window_id: str) -> DigestWindow:
        """The window and its summary, or UnknownWindow."""
        ...

    async def complete(self, window_id: str, owner: str, now: float) -> None:
        """The digest was sent: DONE, whoever holds the lease now (as single emails do)."""
        ...

    async def release(self, window_id: str, owner: str, now: float) -> None:
        """The send failed: due again at once, still closed. Only while `owner` holds it."""
        ...

    async def pending(self, now: float) -> list[WindowInfo]:
        """Every window not yet sent, by due time."""
        ...

    async def aclose(self) -> None: ...


def check_rate(limit: int, per_seconds: float) -> None:
    """ValueError unless a rate can allow an email (every backend's `take` checks first)."""
    if limit < 1:
        raise ValueError(f"rate limit must be 1 or more, not {limit}")
    if not per_seconds > 0:
        raise ValueError(f"rate period must be more than 0 seconds, not {per_seconds}")


def leads(leading_after: float | None, previous_closed_at: float | None, now: float) -> bool:
    """Whether an event opening a route's window is its leading change: leading is on, and the
    route never had a window or its previous one closed `leading_after` seconds ago or more."""
    if leading_after is None:
        return False
    return previous_closed_at is None or now - previous_closed_at >= leading_after


def window_id(route: str, opened_ms: int) -> str:
    """Deterministic: the route and the window's start in milliseconds."""
    return f"{route}:{opened_ms}"


def next_opened_ms(now: float, last_opened_ms: int | None) -> int:
    """The start of a route's next window: `now`, but always after the previous window's start,
    so two windows opened in one millisecond (one closed by a claim) never share an id."""
    now_ms = int(now * 1000)
    return now_ms if last_opened_ms is None else max(now_ms, last_opened_ms + 1)


def change_digest(route: str, change_key: str) -> bytes:
    """16 bytes of SHA-256 over (route, change key): a change is deduplicated per route, and the
    length prefix keeps `("a:b", "c")` apart from `("a", "b:c")`."""
    return hashlib.sha256(f"{len(route)}:{route}\n{change_key}".encode()).digest()[:16]
