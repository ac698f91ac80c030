"""In-process records: the lease table every single-process store keeps its claims in, and the
memory store (for tests and throwaway runs: it forgets everything on restart)."""

from __future__ import annotations

import time

from app.delivery.store import Claim

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
