"""Where digest windows wait for their flush, durably, and where rate routes count their emails.

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
  route's next window, so every event is in exactly one email. A claim is a fenced lease
  (app.stores.base): the flush renews it immediately before it sends, and completes or releases
  it with its token.
- A SENDING window whose lease ran out (its sender died) and a RELEASED one (its send failed)
  are due again, as is an OPEN window past its due time; `due` lists them.

`take` counts a `rate` route's emails in periods: the first email after a period ended starts
the next one, and an email over the limit is not allowed: the caller then calls `overflow`, which
joins the event to the period's digest and marks its email keys done in the same backend's
claims (app.stores.claims), in one atomic step, so a redelivery finds it done and neither emails
it alone nor counts it again. A change that already took an email of the current period takes
it again without spending the budget twice (its first delivery failed after the take).

The idempotency claims of single emails are a separate Protocol (app.stores.claims); the two
share `Claim`, `Lease` and `StoreUnavailable`. Key hashing lives here, once, for every backend.
Every method takes `now` (seconds since the epoch) from the caller, so one clock decides and
tests can move it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from app.config import DEDUPE_RETENTION_SECONDS
from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim, Lease, StoreUnavailable

__all__ = [
    "RETENTION_SECONDS",
    "Added",
    "Claim",
    "DigestStore",
    "DigestWindow",
    "Lease",
    "StoreUnavailable",
    "Taken",
    "UnknownWindow",
    "WindowInfo",
    "WindowState",
    "change_digest",
    "window_id",
]

# By default a change key is remembered this long after it joined a window, and a done window is
# kept this long after its email (DEDUPE_RETENTION; each backend takes its own as an argument).
RETENTION_SECONDS = DEDUPE_RETENTION_SECONDS


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
    again: bool = False  # this change had taken an email of this period before: not counted twice


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

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        """A rate route's event past its limit: joins the route's window as `add` does (never
        leading) and marks each of `done_keys` (keys of app.stores.claims, in this backend's
        claims) done for the retention from the wall clock, as the claims store reads its done
        marks (`now` is the digest's clock, which tests may move), in one atomic step: both
        happen, or neither. A change already in a window is not added again, and its keys are
        marked done all the same."""
        ...

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        """One email of a rate route for the change `change_key`: allowed while fewer than
        `limit` were taken in the route's current period. With no period, or `now` at or after
        its end, a new period [now, now + per_seconds) starts with this email. A change that
        already took an email of the current period is allowed again without counting
        (`Taken.again`). Atomic, and durable before it returns (StoreUnavailable otherwise);
        ValueError for a limit below 1 or a period of 0 or less."""
        ...

    async def due(self, now: float, limit: int) -> list[str]:
        """Windows to flush, earliest first: OPEN ones past their due time, RELEASED ones, and
        SENDING ones whose lease ran out."""
        ...

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        """A Lease closes the window and makes the caller its sender until `now +
        lease_seconds`; Claim.IN_FLIGHT while another claim's lease runs; Claim.DONE when it
        was sent, or is unknown (purged): nothing is left to send."""
        ...

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        """The lease extended to `now + lease_seconds`, only while `token` is the window's
        sender and its lease has not run out at `now`; None otherwise: do not send."""
        ...

    async def read(self, window_id: str) -> DigestWindow:
        """The window and its summary, or UnknownWindow."""
        ...

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        """The digest was sent (or kept in the dead-letter folder): DONE, whoever holds the
        window now. True when `token` was still its sender (also for a retry of that sender's
        own completion); False when another claim had taken it over or completed it."""
        ...

    async def release(self, window_id: str, token: int, now: float) -> None:
        """The send failed: due again at once, still closed. Only while `token` holds it."""
        ...

    async def pending(self, now: float) -> list[WindowInfo]:
        """Every window not yet sent, by due time, with its event count (never reading the
        events themselves: a window may hold hundreds of thousands)."""
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
