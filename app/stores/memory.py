"""In-process records: the lease table every single-process store keeps its claims in, and the
memory stores of claims and of digest windows (for tests and throwaway runs: they forget
everything on restart). Every method runs on the event loop without awaiting, so each is atomic.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim, Lease, next_token
from app.stores.windows import (
    RETENTION_SECONDS,
    Added,
    DigestWindow,
    Taken,
    UnknownWindow,
    WindowInfo,
    WindowState,
    change_digest,
    check_rate,
    leads,
    next_opened_ms,
    window_id,
)

_SWEEP_EVERY = 1024


class Leases:
    """Key -> (token, expiry), swept now and then. Every call runs on the event loop thread
    without awaiting, so check-then-set is atomic. Tokens grow across all keys (one counter for
    the table), so a token outlives the entry it was handed out with."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, float]] = {}
        self._writes = 0
        self._last_token: int | None = None

    def held(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] > now

    def take(self, key: str, now: float, seconds: float) -> Lease:
        token = self._last_token = next_token(self._last_token, now)
        self._entries[key] = (token, now + seconds)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            for stale in [k for k, (_, expiry) in self._entries.items() if expiry <= now]:
                del self._entries[stale]
        return Lease(token, now + seconds)

    def claim(self, key: str, now: float, lease_seconds: float) -> Lease | Claim:
        """The claim half of a store's `claim`, once the key is known not to be done."""
        if self.held(key, now):
            return Claim.IN_FLIGHT
        return self.take(key, now, lease_seconds)

    def superseded(self, key: str, token: int) -> bool:
        """Whether another claim of `key` came after the one of `token` (and still has its
        entry): what `complete` reports as a claim taken over."""
        entry = self._entries.get(key)
        return entry is not None and entry[0] != token

    def renew(self, key: str, token: int, now: float, lease_seconds: float) -> Lease | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != token or entry[1] <= now:
            return None
        self._entries[key] = (token, now + lease_seconds)
        return Lease(token, now + lease_seconds)

    def drop(self, key: str, token: int | None = None) -> None:
        """Forget the lease; with `token`, only while that token still holds it."""
        entry = self._entries.get(key)
        if entry is not None and (token is None or entry[0] == token):
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


class MemoryStore:
    def __init__(self, retention_seconds: float = RETENTION_SECONDS) -> None:
        self.retention_seconds = retention_seconds
        self._claims = Leases()
        # key -> when its done mark expires, and the token that completed it while holding it
        self._done: dict[str, tuple[float, int | None]] = {}
        self._done_writes = 0

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        now = time.time()
        if self._done_by(key, now) is not None:
            return Claim.DONE
        return self._claims.claim(key, now, lease_seconds)

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        now = time.time()
        if self._done_by(key, now) is not None:
            return None
        return self._claims.renew(key, token, now, lease_seconds)

    async def complete(self, key: str, token: int) -> bool:
        now = time.time()
        done = self._done_by(key, now)
        if done is not None:
            return done == (token,)  # a retry of the holder's own done mark
        held = not self._claims.superseded(key, token)
        self.mark_done([key], now, token if held else None)
        return held

    async def release(self, key: str, token: int) -> None:
        self._claims.drop(key, token)

    def _done_by(self, key: str, now: float) -> tuple[int | None] | None:
        """(the token that completed it while holding it, or None,) while the key's done mark
        lasts; None when it is not done."""
        entry = self._done.get(key)
        return None if entry is None or entry[0] <= now else (entry[1],)

    def mark_done(self, keys: Sequence[str], now: float, token: int | None = None) -> None:
        """Done for the retention, whoever holds the keys (MemoryDigestStore.overflow uses this
        too, in the same step as the event joins its digest)."""
        for key in keys:
            self._done[key] = (now + self.retention_seconds, token)
            self._claims.drop(key)
        self._done_writes += len(keys)
        if self._done_writes >= _SWEEP_EVERY:
            self._done_writes = 0
            for stale in [k for k, (expiry, _) in self._done.items() if expiry <= now]:
                del self._done[stale]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._claims.clear()
        self._done.clear()


@dataclass(slots=True)
class _Window:
    id: str
    route: str
    opened_at: float
    due_at: float
    summary: DigestSummary
    state: WindowState = WindowState.OPEN
    token: int | None = None  # the latest claim's
    done_by: int | None = None  # the token that completed it while holding it
    ready_at: float = 0.0  # when `due` lists it: due_at, lease end, or release time
    expires_at: float | None = None  # done windows only
    leading: bytes | None = None  # the change digest of its leading change, if it had one

    def info(self) -> WindowInfo:
        return WindowInfo(
            self.id, self.route, self.opened_at, self.due_at, self.summary.count, self.state
        )


@dataclass(slots=True)
class _Route:
    open_window: str | None = None
    last_opened_ms: int | None = None
    last_closed_at: float | None = None


@dataclass(slots=True)
class _Period:
    end: float
    used: int
    takers: set[bytes] = field(default_factory=set)  # change digests that took one


@dataclass(slots=True)
class MemoryDigestStore:
    """`claims` is the memory store whose keys `overflow` marks done (the service's own; a
    fresh one when not given)."""

    retention_seconds: float = RETENTION_SECONDS
    claims: MemoryStore = field(default_factory=MemoryStore)
    _windows: dict[str, _Window] = field(default_factory=dict)
    _routes: dict[str, _Route] = field(default_factory=dict)
    _changes: dict[bytes, tuple[str, float]] = field(default_factory=dict)  # -> window, expiry
    _periods: dict[str, _Period] = field(default_factory=dict)
    _adds: int = 0

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        return self._add(route, window_seconds, max_items, item, now, leading_after)

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        added = self._add(route, window_seconds, max_items, item, now, None)
        # No await in between: one step. Done marks follow the claims store's own clock.
        self.claims.mark_done(done_keys, time.time())
        return added

    def _add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None,
    ) -> Added:
        self._purge(now)
        state = self._routes.setdefault(route, _Route())
        key = change_digest(route, item.change_key)
        seen = self._changes.get(key)
        if seen is not None and seen[1] > now:
            joined = self._windows.get(seen[0])
            leading = joined is not None and joined.leading == key
            return Added(seen[0], True, False, state.last_closed_at, leading)
        opened = state.open_window is None
        leading = opened and leads(leading_after, state.last_closed_at, now)
        if state.open_window is None:
            opened_ms = next_opened_ms(now, state.last_opened_ms)
            new = _Window(
                id=window_id(route, opened_ms),
                route=route,
                opened_at=opened_ms / 1000,
                due_at=opened_ms / 1000 + window_seconds,
                summary=DigestSummary.empty(max_items),
            )
            new.ready_at = new.due_at
            self._windows[new.id] = new
            state.open_window, state.last_opened_ms = new.id, opened_ms
        window = self._windows[state.open_window]
        if leading:
            window.leading = key  # sent alone by the caller, not in the summary
        else:
            window.summary.add(item)
        self._changes[key] = (window.id, now + self.retention_seconds)
        return Added(window.id, False, opened, state.last_closed_at, leading)

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        check_rate(limit, per_seconds)
        period = self._periods.get(route)
        taker = change_digest(route, change_key)
        if period is None or now >= period.end:
            period = self._periods[route] = _Period(now + per_seconds, 0)
        elif taker in period.takers:
            return Taken(True, period.end, period.used, again=True)
        if period.used >= limit:
            return Taken(False, period.end, period.used)
        period.used += 1
        period.takers.add(taker)
        return Taken(True, period.end, period.used)

    async def due(self, now: float, limit: int) -> list[str]:
        ready = [w for w in self._windows.values() if w.state is not WindowState.DONE]
        ready = sorted((w for w in ready if w.ready_at <= now), key=lambda w: w.ready_at)
        return [w.id for w in ready[:limit]]

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        window = self._windows.get(window_id)
        if window is None or window.state is WindowState.DONE:
            return Claim.DONE
        if window.state is WindowState.SENDING and window.ready_at > now:
            return Claim.IN_FLIGHT
        if window.state is WindowState.OPEN:
            self._close(window, now)
        window.token = next_token(window.token, now)
        window.state, window.ready_at = WindowState.SENDING, now + lease_seconds
        return Lease(window.token, window.ready_at)

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        window = self._windows.get(window_id)
        if (
            window is None
            or window.state is not WindowState.SENDING
            or window.token != token
            or window.ready_at <= now
        ):
            return None
        window.ready_at = now + lease_seconds
        return Lease(token, window.ready_at)

    async def read(self, window_id: str) -> DigestWindow:
        window = self._windows.get(window_id)
        if window is None:
            raise UnknownWindow(window_id)
        return DigestWindow(window.info(), copy.deepcopy(window.summary))

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        window = self._windows.get(window_id)
        if window is None:
            return False
        if window.state is WindowState.DONE:
            return window.done_by == token  # a retry of this sender's own, or another's
        if window.state is WindowState.OPEN:
            self._close(window, now)
        held = window.token == token
        window.state, window.done_by = WindowState.DONE, token if held else None
        window.expires_at = now + self.retention_seconds
        return held

    async def release(self, window_id: str, token: int, now: float) -> None:
        window = self._windows.get(window_id)
        if window is not None and window.state is WindowState.SENDING and window.token == token:
            window.state, window.ready_at = WindowState.RELEASED, now

    async def pending(self, now: float) -> list[WindowInfo]:
        waiting = [w for w in self._windows.values() if w.state is not WindowState.DONE]
        return [w.info() for w in sorted(waiting, key=lambda w: (w.due_at, w.id))]

    async def aclose(self) -> None:
        self._windows.clear()
        self._routes.clear()
        self._changes.clear()
        self._periods.clear()

    def _close(self, window: _Window, now: float) -> None:
        state = self._routes[window.route]
        if state.open_window == window.id:
            state.open_window = None
        state.last_closed_at = now

    def _purge(self, now: float) -> None:
        # Cheap enough for tests and throwaway runs; the durable stores purge in batches.
        self._adds += 1
        if self._adds % 1024 == 0:
            for key in [k for k, (_, expiry) in self._changes.items() if expiry <= now]:
                del self._changes[key]
            for done in [
                w.id for w in self._windows.values() if w.expires_at and w.expires_at <= now
            ]:
                del self._windows[done]
