"""In-process store: for tests and throwaway runs (forgets everything on restart)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.delivery.store import Claim

_PURGE_EVERY = 1024


@dataclass(slots=True)
class _Entry:
    done: bool
    owner: str
    expires_at: float


class MemoryStore:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._writes = 0

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        now = time.time()
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at > now:
            return Claim.DONE if entry.done else Claim.IN_FLIGHT
        self._entries[key] = _Entry(done=False, owner=owner, expires_at=now + lease_seconds)
        self._purge(now)
        return Claim.CLAIMED

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        self._entries[key] = _Entry(done=True, owner=owner, expires_at=time.time() + keep_seconds)

    async def release(self, key: str, owner: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and not entry.done and entry.owner == owner:
            del self._entries[key]

    def _purge(self, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            expired = [key for key, entry in self._entries.items() if entry.expires_at <= now]
            for key in expired:
                del self._entries[key]

    async def aclose(self) -> None:
        self._entries.clear()
