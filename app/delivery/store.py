"""Where deliveries are claimed and remembered, so a redelivered event sends no second email.

Every backend knows, per notification key, one of two states:
- claimed by an owner until its lease runs out (a send is in flight; if the process dies the
  claim goes with it, or its lease expires, and a redelivery may claim it again);
- done until the retention runs out (longer than Eventarc's 24 hours of redelivery).
Each operation is atomic in its backend, so concurrent deliveries of one change claim it once:
within one process for `memory` and `sqlite` (which keep claims in memory), across every
instance for `redis`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Claim(StrEnum):
    CLAIMED = "claimed"  # this caller owns the send
    IN_FLIGHT = "in-flight"  # another caller is sending it now
    DONE = "done"  # already sent


class InFlight(Exception):
    """Another delivery of the same change is sending right now: answer 409, Eventarc retries."""


class StoreUnavailable(Exception):
    """The store could not be read or written; the delivery must be retried later."""


class IdempotencyStore(Protocol):
    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim: ...

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        """Mark the key done (the email was accepted), whoever holds the lease now."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give up a claim this owner still holds, so a redelivery can send."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached now (for /healthz)."""
        ...

    async def aclose(self) -> None: ...


def open_store(url: str) -> IdempotencyStore:
    """`memory`, `sqlite:///PATH`, `redis://HOST:PORT/DB` or `firestore://[PROJECT]/DATABASE`
    (backends imported only when used)."""
    if url == "memory":
        from app.delivery.memory_store import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from app.delivery.sqlite_store import SqliteStore

        return SqliteStore.open(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        from app.delivery.redis_store import RedisStore

        return RedisStore.from_url(url)
    if url.startswith("firestore://"):
        from app.delivery.firestore_store import FirestoreStore

        return FirestoreStore.from_url(url)
    raise ValueError(f"unknown idempotency store URL scheme: {url.split(':', 1)[0]!r}")
