"""In-process records: the lease table every single-process store keeps its claims in, and the
memory stores of claims and of digest windows (for tests and throwaway runs: they forget
everything on restart). Every method runs on the event loop without awaiting, so each is atomic."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim
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
    """Key -> (owner, expiry), swept now and then. Every call runs on the event loop thread
    without awaiting, so check-then-set is atomic."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, float]] = {}
        self._writes = 0

    def held(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] > now

    def take(self, key: str, owner: str, expires_at: float) -> None:
        self._entries[key] = (owner, expires_at)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            now = time.time()
            for stale in [k for k, (_, expiry) in self._entries.items() if expiry <= now]:
                del self._entries[stale]

    def claim(self, key: str, owner: str, now: float, lease_seconds: float) -> Claim:
        """The claim half of a store's `claim`, once the key is known not to be done."""
        if self.held(key, now):
            return Claim.IN_FLIGHT
        self.take(key, owner, now + lease_seconds)
        return Claim.CLAIMED

    def drop(self, key: str, owner: str | None = None) -> None:
        """Forget the lease; with `owner`, only while that owner still holds it."""
        entry = self._entries.get(key)
        if entry is not None and (owner is None or entry[0] == owner):
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


class MemoryStore:
    def __init__(self) -> None:
        self._claims = Leases()
        self._done = Leases()

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        now = time.time()
        if self._done.held(key, now):
            return Claim.DONE
        return self._claims.claim(key, owner, now, lease_seconds)

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        self._done.take(key, owner, time.time() + keep_seconds)
        self._claims.drop(key)

    async def release(self, key: str, owner: str) -> None:
        self._claims.drop(key, owner)

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
    owner: str | None = None
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
class MemoryDigestStore:
    retention_seconds: float = RETENTION_SECONDS
    _windows: dict[str, _Window] = field(default_factory=dict)
    _routes: dict[str, _Route] = field(default_factory=dict)
    _changes: dict[bytes, tuple[str, float]] = field(default_factory=dict)  # -> window, expiry
    _periods: dict[str, tuple[float, int]] = field(default_factory=dict)  # route -> end, used
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

    async def take(self, route: str, limit: int, per_seconds: float, now: float) -> Taken:
        check_rate(limit, per_seconds)
        period = self._periods.get(route)
        if period is None or now >= period[0]:
            period = (now + per_seconds, 1)
        elif period[1] < limit:
            period = (period[0], period[1] + 1)
        else:
            return Taken(False, period[0], period[1])
        self._periods[route] = period
        return Taken(True, *period)

    async def due(self, now: float, limit: int) -> list[str]:
        ready = [w for w in self._windows.values() if w.state is not WindowState.DONE]
        ready = sorted((w for w in ready if w.ready_at <= now), key=lambda w: w.ready_at)
        return [w.id for w in ready[:limit]]

    async def claim(self, window_id: str, owner: str, lease_seconds: float, now: float) -> Claim:
        window = self._windows.get(window_id)
        if window is None or window.state is WindowState.DONE:
            return Claim.DONE
        if window.state is WindowState.SENDING and window.ready_at > now and window.owner != owner:
            return Claim.IN_FLIGHT
        if window.state is WindowState.OPEN:
            self._close(window, now)
        window.state, window.owner, window.ready_at = (
            WindowState.SENDING,
            owner,
            now + lease_seconds,
        )
        return Claim.CLAIMED

    async def read(self, window_id: str) -> DigestWindow:
        window = self._windows.get(window_id)
        if window is None:
            raise UnknownWindow(window_id)
        return DigestWindow(window.info(), copy.deepcopy(window.summary))

    async def complete(self, window_id: str, owner: str, now: float) -> None:
        window = self._windows.get(window_id)
        if window is None or window.state is WindowState.DONE:
            return
        if window.state is WindowState.OPEN:
            self._close(window, now)
        window.state, window.owner = WindowState.DONE, None
        window.expires_at = now + self.retention_seconds

    async def release(self, window_id: str, owner: str, now: float) -> None:
        window = self._windows.get(window_id)
        if window is not None and window.state is WindowState.SENDING and window.owner == owner:
            window.state, window.owner, window.ready_at = WindowState.RELEASED, None, now

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
