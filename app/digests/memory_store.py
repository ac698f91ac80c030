"""Digest windows in process memory: for tests and throwaway runs (forgotten on restart). Not
wired into the service yet (issue 11). Every method runs on the event loop without awaiting, so
each is atomic."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from app.digests.store import (
    RETENTION_SECONDS,
    Added,
    Claim,
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
from app.digests.window import DigestItem, DigestSummary


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
